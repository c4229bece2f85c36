"""User-facing errors. Each carries a message that names the problem; the CLI prints it without a traceback
and the HTTP layer maps it to a 4xx with an OpenAI-style error body."""


class FreeholdError(Exception):
    """Base class for every error caused by user input or a user-supplied file."""


class ModelLoadError(FreeholdError):
    """The model path is missing, unreadable, truncated, or describes something Freehold cannot run."""


class UnsupportedModelError(ModelLoadError):
    """Architecture, tensor type or feature that Freehold does not implement."""


class PromptTooLongError(FreeholdError):
    """A request needs more tokens than the model context or the KV budget allows."""

    def __init__(self, message: str, num_tokens: int, limit: int):
        super().__init__(message)
        self.num_tokens = num_tokens
        self.limit = limit


class InvalidRequestError(FreeholdError):
    """A request parameter is out of range or of the wrong kind."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class NotFoundError(InvalidRequestError):
    """A named thing that does not exist (a vector store, an uploaded file): HTTP 404."""
