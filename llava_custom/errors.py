"""The model side's exception family; service.py maps each class to an HTTP status."""


class LlavaError(Exception):
    """Base class: the message is meant for the person running or calling the service."""


class ModelLoadError(LlavaError):
    """The checkpoint could not be found, recognised or placed on the requested device."""


class PromptTooLong(LlavaError):
    """The prompt plus the visual tokens do not fit the model's context window."""


class InvalidPrompt(LlavaError):
    """The question contains text the prompt format reserves, such as a visual placeholder."""
