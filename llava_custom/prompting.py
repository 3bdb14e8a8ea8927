"""Prompts exactly as LLaVA-Video's inference example builds them.

The conversation format is LLaVA-NeXT's ``conv_templates["qwen_1_5"]`` (ChatML with the system
prompt "You are a helpful assistant."); the video prompt puts the time instruction right after
the visual placeholder, then a newline and the user's question.
"""

from __future__ import annotations

from collections.abc import Sequence

SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_VIDEO_PROMPT = "Please describe what is happening in this video in detail."
DEFAULT_IMAGE_PROMPT = "Please describe what is in this image in detail."
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


def time_instruction(duration: float, frame_times: Sequence[float]) -> str:
    """The sentence that tells the model how long the video is and when each frame was taken."""
    times = ",".join(f"{t:.2f}s" for t in frame_times)
    return (
        f"The video lasts for {duration:.2f} seconds, and {len(frame_times)} frames are uniformly sampled "
        f"from it. These frames are located at {times}.Please answer the following questions related to this video."
    )


def render_chat(user_message: str, system: str = SYSTEM_PROMPT) -> str:
    """One user turn in the ``qwen_1_5`` format, ending where the assistant's answer starts."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user_message}<|im_end|>\n<|im_start|>assistant\n"
    )


def video_prompt(question: str | None, duration: float, frame_times: Sequence[float]) -> str:
    """Full prompt text for a question about a video (default question when none is given)."""
    question = question or DEFAULT_VIDEO_PROMPT
    return render_chat(f"{VIDEO_PLACEHOLDER}{time_instruction(duration, frame_times)}\n{question}")


def image_prompt(question: str | None) -> str:
    """Full prompt text for a question about an image (default question when none is given)."""
    return render_chat(f"{IMAGE_PLACEHOLDER}\n{question or DEFAULT_IMAGE_PROMPT}")
