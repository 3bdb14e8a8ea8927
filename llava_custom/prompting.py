"""Prompts exactly as LLaVA-Video's inference example builds them.

The conversation format is LLaVA-NeXT's ``conv_templates["qwen_1_5"]`` (ChatML with the system
prompt "You are a helpful assistant."); the video prompt puts the time instruction right after
the visual placeholder, then a newline and the user's question. A :class:`Conversation` of
several turns renders as that template's ``get_prompt()`` does after appending each message in
turn and a final empty assistant message; the picture goes into one user turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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


@dataclass(frozen=True)
class Turn:
    """One message of a conversation."""

    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True)
class Conversation:
    """Turns ending with the user's, an optional system prompt, and the index in ``turns`` of the
    user turn the video or image belongs to (ignored for text-only requests)."""

    turns: tuple[Turn, ...]
    system: str | None = None
    media_turn: int = 0


def render_conversation(conversation: Conversation, media: str | None = None, default_question: str = "") -> str:
    """The ``qwen_1_5`` prompt of ``conversation``, ending where the assistant's answer starts.

    ``media`` (placeholder and any instruction) opens the media turn's text, whose empty text means
    ``default_question``; without ``media`` the prompt has no placeholder. Raises ValueError for a
    conversation the model cannot answer (no turns, an unknown role, not ending with the user's
    turn, a media turn that is not a user turn).
    """
    turns = conversation.turns
    if not turns or turns[-1].role != "user":
        raise ValueError("the conversation must end with a user message")
    for turn in turns:
        if turn.role not in ("user", "assistant"):
            raise ValueError(f"a message's role must be user or assistant, not {turn.role!r}")
    if media is not None and not (0 <= conversation.media_turn < len(turns)):
        raise ValueError(f"media_turn {conversation.media_turn} is not a message of the conversation")
    if media is not None and turns[conversation.media_turn].role != "user":
        raise ValueError("the video or image must belong to a user message")
    # The original's CHATML get_prompt: system + sep + "\n", then role + "\n" + message + sep + "\n"
    # for each message, then the empty assistant message as role + "\n". (It writes any empty
    # message that way; an empty earlier message keeps its <|im_end|> here, as ChatML has it.)
    parts = [f"<|im_start|>system\n{conversation.system or SYSTEM_PROMPT}<|im_end|>\n"]
    for index, turn in enumerate(turns):
        text = turn.text
        if media is not None and index == conversation.media_turn:
            text = f"{media}{text or default_question}"
        parts.append(f"<|im_start|>{turn.role}\n{text}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def as_conversation(question: str | Conversation | None) -> Conversation:
    """A plain question (None or empty: the default one) as a one-turn conversation."""
    if isinstance(question, Conversation):
        return question
    return Conversation((Turn("user", question or ""),))


def video_prompt(question: str | Conversation | None, duration: float, frame_times: Sequence[float]) -> str:
    """Full prompt text for a question or conversation about a video (an empty question: the default)."""
    media = f"{VIDEO_PLACEHOLDER}{time_instruction(duration, frame_times)}\n"
    return render_conversation(as_conversation(question), media, DEFAULT_VIDEO_PROMPT)


def image_prompt(question: str | Conversation | None) -> str:
    """Full prompt text for a question or conversation about an image (an empty question: the default)."""
    return render_conversation(as_conversation(question), f"{IMAGE_PLACEHOLDER}\n", DEFAULT_IMAGE_PROMPT)


def text_prompt(conversation: Conversation) -> str:
    """Full prompt text for a conversation without a picture."""
    return render_conversation(conversation)
