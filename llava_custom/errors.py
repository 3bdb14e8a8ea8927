"""The model side's exception family; service.py maps each class to an HTTP status."""


class LlavaError(Exception):
    """Base class: the message is meant for the person running or calling the service."""


class ModelLoadError(LlavaError):
    """The checkpoint could not be found, recognised or placed on the requested device."""


class PromptTooLong(LlavaError):
    """The prompt plus the visual tokens do not fit the model's context window."""


class InvalidPrompt(LlavaError):
    """The question contains text the prompt format reserves, such as a visual placeholder."""


class EngineBusy(LlavaError):
    """Too many requests already wait for the model; the caller should retry later."""


class RequestTimeout(LlavaError):
    """The request was not answered within the engine's time limit."""


class RequestCancelled(LlavaError):
    """The request was cancelled (its client went away) before it finished."""


class EngineClosed(LlavaError):
    """The engine was shut down before the request finished."""
