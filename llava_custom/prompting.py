"""Prompts exactly as LLaVA-Video's inference example builds them.

The conversation format is LLaVA-NeXT's ``conv_templates["qwen_1_5"]`` (ChatML with the system
prompt "You are a helpful assistant."); the video prompt puts the time instruction right after
the visual placeholder, then a newline and the user's question. A :class:`Conversation` of
several turns renders as that template's ``get_prompt()`` does after appending each message in
turn and a final empty assistant message.

Pictures open the user turn they belong to, in order: an image as ``<image>\n``, a video as its
placeholder, its time instruction and ``\n`` (the original writes ``<image>`` for both and tells
them apart by the ``modalities`` list; the engine's tokenizer has a token for each), then the
turn's text. The k-th placeholder of the conversation takes the k-th picture; the service writes
every placeholder itself, so their count always matches the pictures'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_VIDEO_PROMPT = "Please describe what is happening in this video in detail."
DEFAULT_IMAGE_PROMPT = "Please describe what is in this image in detail."
DEFAULT_PICTURES_PROMPT = "Please describe what is in these pictures in detail."
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


def time_instruction(duration: float, frame_times: Sequence[float]) -> str:
    """The sentence that tells the model how long the video is and when each frame was taken."""
    times = ",".join(f"{t:.2f}s" for t in frame_times)
    return (
        f"The video lasts for {duration:.2f} seconds, and {len(frame_times)} frames are uniformly sampled "
        f"from it. These frames are located at {times}.Please answer the following questions related to this video."
    )


@dataclass(frozen=True)
class Turn:
    """One message of a conversation; ``pictures``: how many of the request's pictures (in order)
    open it."""

    role: Literal["user", "assistant"]
    text: str
    pictures: int = 0


@dataclass(frozen=True)
class Conversation:
    """Turns ending with the user's and an optional system prompt. Where the pictures go: each
    turn's ``pictures``; when no turn has any, all of them open the turn at index ``media_turn``
    (the one-picture form)."""

    turns: tuple[Turn, ...]
    system: str | None = None
    media_turn: int = 0

    def picture_counts(self, pictures: int) -> list[int]:
        """How many of ``pictures`` open each turn; ValueError when they do not add up."""
        counts = [turn.pictures for turn in self.turns]
        if not any(counts) and pictures:
            if not (0 <= self.media_turn < len(self.turns)):
                raise ValueError(f"media_turn {self.media_turn} is not a message of the conversation")
            counts[self.media_turn] = pictures
        if sum(counts) != pictures:
            raise ValueError(f"the conversation places {sum(counts)} pictures, but the request has {pictures}")
        if any(count and turn.role != "user" for count, turn in zip(counts, self.turns, strict=True)):
            raise ValueError("a video or image must belong to a user message")
        return counts


def render_conversation(
    conversation: Conversation, openings: str | Sequence[str] | None = None, default_question: str = ""
) -> str:
    """The ``qwen_1_5`` prompt of ``conversation``, ending where the assistant's answer starts.

    ``openings`` are the pictures' placeholders with their instructions (one string: one picture),
    in order; each turn's pictures open its text, and a turn with pictures and no text asks
    ``default_question``. Raises ValueError for a conversation the model cannot answer (no turns,
    an unknown role, not ending with the user's turn, a picture in a turn that is not the user's).
    """
    openings = [openings] if isinstance(openings, str) else list(openings or ())
    turns = conversation.turns
    if not turns or turns[-1].role != "user":
        raise ValueError("the conversation must end with a user message")
    for turn in turns:
        if turn.role not in ("user", "assistant"):
            raise ValueError(f"a message's role must be user or assistant, not {turn.role!r}")
    counts = conversation.picture_counts(len(openings))
    # The original's CHATML get_prompt: system + sep + "\n", then role + "\n" + message + sep + "\n"
    # for each message, then the empty assistant message as role + "\n". (It writes any empty
    # message that way; an empty earlier message keeps its <|im_end|> here, as ChatML has it.)
    parts = [f"<|im_start|>system\n{conversation.system or SYSTEM_PROMPT}<|im_end|>\n"]
    taken = 0
    for turn, count in zip(turns, counts, strict=True):
        text = turn.text
        if count:
            text = "".join(openings[taken : taken + count]) + (text or default_question)
            taken += count
        parts.append(f"<|im_start|>{turn.role}\n{text}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def as_conversation(question: str | Conversation | None) -> Conversation:
    """A plain question (None or empty: the default one) as a one-turn conversation."""
    if isinstance(question, Conversation):
        return question
    return Conversation((Turn("user", question or ""),))


def video_opening(duration: float, frame_times: Sequence[float]) -> str:
    """What a video puts into its turn: its placeholder, its time instruction and a newline."""
    return f"{VIDEO_PLACEHOLDER}{time_instruction(duration, frame_times)}\n"


IMAGE_OPENING = f"{IMAGE_PLACEHOLDER}\n"


def video_prompt(question: str | Conversation | None, duration: float, frame_times: Sequence[float]) -> str:
    """Full prompt text for a question or conversation about a video (an empty question: the default)."""
    return render_conversation(as_conversation(question), video_opening(duration, frame_times), DEFAULT_VIDEO_PROMPT)


def image_prompt(question: str | Conversation | None) -> str:
    """Full prompt text for a question or conversation about an image (an empty question: the default)."""
    return render_conversation(as_conversation(question), IMAGE_OPENING, DEFAULT_IMAGE_PROMPT)


def pictures_prompt(question: str | Conversation | None, openings: Sequence[str]) -> str:
    """Full prompt text for a question or conversation about several pictures, each given by
    its opening (:data:`IMAGE_OPENING`, :func:`video_opening`), in order."""
    return render_conversation(as_conversation(question), openings, DEFAULT_PICTURES_PROMPT)


def text_prompt(conversation: Conversation) -> str:
    """Full prompt text for a conversation without a picture."""
    return render_conversation(conversation)
