"""Golden answers from the original LLaVA-NeXT code, for tests/test_golden.py.

Runs LLaVA-NeXT's own LLaVA-Video inference recipe (docs/LLaVA_Video_1003.md, and the OneVision
tutorial for images) on the cases that ``python -m tools.golden_cases WORK`` wrote, and writes
tests/data/golden/golden.json. It runs in an environment of its own (LLaVA-NeXT's: transformers
4.45, decord, ...; see README, "Fidelity"), imports nothing from this project, and takes the
LLaVA-NeXT source tree from ``--llava-next`` (put on sys.path; nothing is installed or copied):

    python tools/golden_reference.py --llava-next PATH/TO/LLaVA-NeXT --work WORK

Deviations from the recipe, all forced by running tiny checkpoints on a CPU: the model is loaded
in bfloat16 as the recipe does (its loader accepts nothing else) and cast to float32; attention
is ``sdpa`` instead of flash-attention 2; pixel values stay float32; 24 new tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP_K = 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llava-next", type=Path, required=True, help="LLaVA-NeXT source tree (git clone)")
    parser.add_argument("--work", type=Path, required=True, help="the work directory of tools.golden_cases")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "golden" / "golden.json")
    parser.add_argument("--commit", help="LLaVA-NeXT commit, when --llava-next is not a git checkout")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    manifest = json.loads((args.work / "cases.json").read_text())
    # Before transformers / huggingface_hub are imported: the tiny vision tower is only in this cache.
    os.environ["HF_HUB_CACHE"] = manifest["hub_cache"]
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, str(args.llava_next.resolve()))

    import torch
    import transformers
    from llava.model.builder import load_pretrained_model

    results = []
    for variant, spec in manifest["variants"].items():
        tokenizer, model, image_processor, _ = load_pretrained_model(
            spec["path"], None, "llava_qwen", torch_dtype="bfloat16", device_map="auto", attn_implementation="sdpa"
        )
        check_weights(model, Path(spec["path"]))
        model = model.float().eval()
        for case in manifest["cases"]:
            if case["variant"] == variant:
                print(f"{case['name']} ({variant})", flush=True)
                run = run_case(case, tokenizer, model, image_processor, manifest["max_new_tokens"])
                results.append(case_record(case) | run)
    order = [case["name"] for case in manifest["cases"]]
    results.sort(key=lambda record: order.index(record["name"]))
    golden = {
        "generated_by": {
            "command": "python tools/golden_reference.py --llava-next PATH --work WORK",
            "llava_next_commit": args.commit or git_commit(args.llava_next),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": "float32 (loaded as bfloat16, then model.float())",
            "attn_implementation": "sdpa",
        },
        "max_new_tokens": manifest["max_new_tokens"],
        "variants": {
            name: {key: spec[key] for key in ("seed", "mm_keys", "fingerprint")}
            for name, spec in sorted(manifest["variants"].items())
        },
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(golden, indent=1) + "\n")
    print(args.out)


def check_weights(model, checkpoint: Path) -> None:
    """The original must run the checkpoint's weights: its tower is first built from the hub cache
    (random there), then overwritten; the embedding is cut to the tokenizer's size."""
    import torch
    from safetensors.torch import load_file

    stored = {}
    for shard in checkpoint.glob("*.safetensors"):
        stored |= load_file(str(shard))
    loaded = model.state_dict()
    assert loaded.keys() == stored.keys(), sorted(loaded.keys() ^ stored.keys())
    for name, tensor in stored.items():
        rows = loaded[name].shape[0] if name in ("model.embed_tokens.weight", "lm_head.weight") else None
        assert torch.equal(loaded[name], tensor[:rows]), f"{name} differs from the checkpoint"


def case_record(case: dict) -> dict:
    keys = ("name", "variant", "modality", "media", "question", "num_frames", "about", "pictures", "turns")
    return {key: case[key] for key in keys if case.get(key) is not None}


def run_case(case: dict, tokenizer, model, image_processor, max_new_tokens: int) -> dict:
    """The recipe for one case; returns the prompt, token counts, first-step logits and greedy ids."""
    import torch
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token
    from PIL import Image

    if case["modality"] == "multi":
        conv, generate_inputs, extra = multi_inputs(case, model, image_processor)
    elif case["modality"] == "video":
        frames, frame_time, video_time, indices = load_video(case["media_path"], case["num_frames"])
        video = image_processor.preprocess(frames, return_tensors="pt")["pixel_values"]
        time_instruction = (
            f"The video lasts for {video_time:.2f} seconds, and {len(video)} frames are uniformly sampled "
            f"from it. These frames are located at {frame_time}.Please answer the following questions related "
            "to this video."
        )
        question = DEFAULT_IMAGE_TOKEN + f"{time_instruction}\n{case['question']}"
        generate_inputs = {"images": [video], "modalities": ["video"]}
        extra = {"frame_indices": indices, "pixel_values_shape": list(video.shape)}
    else:
        image = Image.open(case["media_path"]).convert("RGB")
        # One (1 + tiles, 3, 384, 384) tensor per image, as the OneVision tutorial passes them.
        image_tensor = list(process_images([image], image_processor, model.config))
        question = DEFAULT_IMAGE_TOKEN + "\n" + case["question"]
        generate_inputs = {"images": image_tensor, "image_sizes": [image.size], "modalities": ["image"]}
        extra = {"image_size": list(image.size), "pixel_values_shape": list(image_tensor[0].shape)}
    if case["modality"] != "multi":
        conv = copy.deepcopy(conv_templates["qwen_1_5"])
        conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)

    # The sequence the language model really receives: generate() hands inputs_embeds to Qwen2Model.
    # Later steps pass the new token's id instead.
    embedded_lengths = []

    def record_length(_module, _args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            embedded_lengths.append(kwargs["inputs_embeds"].shape[1])

    hook = model.get_model().register_forward_pre_hook(record_length, with_kwargs=True)
    try:
        with torch.inference_mode():
            output = model.generate(
                input_ids,
                **generate_inputs,
                do_sample=False,
                temperature=0,
                max_new_tokens=max_new_tokens,
                output_scores=True,
                output_logits=True,
                return_dict_in_generate=True,
            )
    finally:
        hook.remove()
    # Generating from inputs_embeds, the returned sequence holds the new tokens only.
    ids = output.sequences[0].tolist()
    first = output.logits[0][0].float()
    top = torch.topk(first, TOP_K)
    # Greedy decoding takes the argmax of the processed scores (repetition penalty applied).
    gaps = []
    for step, scores in enumerate(output.scores):
        best = torch.topk(scores[0].float(), 2)
        assert int(best.indices[0]) == ids[step], "greedy id is not the argmax of its step's scores"
        gaps.append(float(best.values[0] - best.values[1]))
    text_tokens = int((input_ids != IMAGE_TOKEN_INDEX).sum())
    prompt_tokens = embedded_lengths[0]
    return {
        "prompt": prompt,
        "text_tokens": text_tokens,
        "visual_tokens": prompt_tokens - text_tokens,
        "prompt_tokens": prompt_tokens,
        "vocabulary": first.shape[0],
        "first_step_top5": {"ids": top.indices.tolist(), "values": top.values.tolist()},
        "first_step_logsumexp": float(torch.logsumexp(first, 0)),
        "greedy_ids": ids,
        "greedy_gaps": gaps,
        "answer": tokenizer.decode(ids, skip_special_tokens=True).strip(),
        **extra,
    }


def multi_inputs(case: dict, model, image_processor) -> tuple:
    """Several pictures as the OneVision tutorial's multi-image example passes them: the model's
    ``image_aspect_ratio`` overwritten to "pad" (each image centred on a square of the processor's
    mean colour and resized to one tile), a list of one tensor per picture, ``modalities`` saying
    which is a video (LLaVA-Video's recipe for its frames); each turn's pictures open its text,
    an image as ``<image>\n``, a video as ``<image>`` + its time instruction + ``\n``."""

    from llava.constants import DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images
    from PIL import Image

    folder = Path(case["media_dir"])
    tensors, modalities, sizes, openings, shapes = [], [], [], [], []
    aspect = model.config.image_aspect_ratio
    model.config.image_aspect_ratio = "pad"
    try:
        for modality, name, num_frames in case["pictures"]:
            if modality == "video":
                frames, frame_time, video_time, _ = load_video(str(folder / name), num_frames)
                tensor = image_processor.preprocess(frames, return_tensors="pt")["pixel_values"]
                instruction = (
                    f"The video lasts for {video_time:.2f} seconds, and {len(tensor)} frames are uniformly sampled "
                    f"from it. These frames are located at {frame_time}.Please answer the following questions "
                    "related to this video."
                )
                openings.append(f"{DEFAULT_IMAGE_TOKEN}{instruction}\n")
                sizes.append((frames.shape[2], frames.shape[1]))
            else:
                image = Image.open(folder / name).convert("RGB")
                tensor = process_images([image], image_processor, model.config)[0]
                openings.append(f"{DEFAULT_IMAGE_TOKEN}\n")
                sizes.append(image.size)
            tensors.append(tensor)
            modalities.append(modality)
            shapes.append(list(tensor.shape))
    finally:
        model.config.image_aspect_ratio = aspect
    conv = copy.deepcopy(conv_templates["qwen_1_5"])
    taken = 0
    for role, text, count in case["turns"]:
        opening = "".join(openings[taken : taken + count])
        taken += count
        conv.append_message(conv.roles[0] if role == "user" else conv.roles[1], opening + text)
    assert taken == len(tensors), "every picture opens a turn"
    generate = {"images": tensors, "image_sizes": sizes, "modalities": modalities}
    return conv, generate, {"pixel_values_shapes": shapes}


def load_video(path: str, num_frames: int) -> tuple:
    """Frames as docs/LLaVA_Video_1003.md's load_video gives them with force_sample=True.

    decord, one thread; ``num_frames`` indices spread with np.linspace over the whole video and
    truncated to int; times are index / average fps, the duration frame count / average fps.
    """
    import numpy as np
    from decord import VideoReader, cpu

    reader = VideoReader(path, ctx=cpu(0), num_threads=1)
    total, fps = len(reader), reader.get_avg_fps()
    indices = np.linspace(0, total - 1, num_frames, dtype=int).tolist()
    times = ",".join(f"{index / fps:.2f}s" for index in indices)
    return reader.get_batch(indices).asnumpy(), times, total / fps, indices


def git_commit(path: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (pass --commit)"


if __name__ == "__main__":
    main()
