"""jetinfer's shared core: wire protocol, errors, settings, streams, model repository, CLI."""

from jetinfer.errors import (
    BackendError,
    DeadlineExceededError,
    InvalidInputError,
    JetinferError,
    PermanentError,
    RequestError,
    RequestTimeoutError,
    RetryableError,
    TooLargeError,
    UnknownModelError,
)
from jetinfer.protocol import ErrorReply, InferRequest, InferResponse, Tensor

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "DeadlineExceededError",
    "ErrorReply",
    "InferRequest",
    "InferResponse",
    "InvalidInputError",
    "JetinferError",
    "PermanentError",
    "RequestError",
    "RequestTimeoutError",
    "RetryableError",
    "Tensor",
    "TooLargeError",
    "UnknownModelError",
    "__version__",
]
