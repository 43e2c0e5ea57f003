"""One exception tree for the whole project.

::

    JetinferError
    ├── RequestError                  a request cannot be served; carries the wire `code`
    │   ├── PermanentError            retrying cannot help: the worker answers, then `term`s
    │   │   ├── InvalidInputError     invalid_input: undecodable, wrong dtype/shape/size
    │   │   ├── TooLargeError         too_large: over a size or batch limit
    │   │   ├── DeadlineExceededError deadline_exceeded: the client stopped waiting
    │   │   ├── UnknownModelError     unknown_model: nobody serves that model
    │   │   └── ReplyRefusedError     reply_refused: the server refused the reply (DLQ and metrics only)
    │   └── RetryableError            may pass on another try: the worker `nak`s with back-off
    │       └── BackendError          internal: the backend failed (error, out of memory)
    ├── RequestTimeoutError           the client waited `timeout` seconds for a reply
    ├── JobStalledError               a batch job got no reply for its timeout; `waiting_for` says for what
    ├── SettingsError                 a setting is invalid; `setting` names it
    ├── StreamMismatchError           an existing stream differs; `field` names the difference
    ├── StreamMissingError            a stream this process reads does not exist; `name` names it
    ├── RepositoryError               a model repository entry is invalid; `path` says where
    ├── FrontProcessError             a worker's front process did not start or connect
    └── ModelLoadError                a backend could not load a model version

A client receives error replies as the same classes (`error_for_code`), so
`except InvalidInputError` reads the same on both sides. Permanent and retryable are the split
the worker's ack policy is built on
(see `jetinfer.worker.settle.decide`): handlers raise, they never ack themselves.
"""

from __future__ import annotations

from typing import Self

__all__ = [
    "BackendError",
    "DeadlineExceededError",
    "EmbeddedServerError",
    "ExportError",
    "FrontProcessError",
    "InvalidInputError",
    "JetinferError",
    "JobStalledError",
    "ModelLoadError",
    "PermanentError",
    "ReplyRefusedError",
    "RepositoryError",
    "RequestError",
    "RequestTimeoutError",
    "RetryableError",
    "SettingsError",
    "StreamMismatchError",
    "StreamMissingError",
    "StreamUpdateError",
    "TooLargeError",
    "UnknownModelError",
    "error_for_code",
]


class JetinferError(Exception):
    """Base of every error jetinfer raises on purpose."""


class RequestError(JetinferError):
    """A request cannot be served. `code` is the wire error code sent to the client."""

    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def detached(self) -> Self:
        """This error without its traceback (nor those of the exceptions that caused it), to be kept as a
        request's outcome. A traceback holds the frames that raised it, and they hold the request that
        keeps the error: a reference cycle, with the request's data in it, that only the garbage
        collector would free."""
        link: BaseException | None = self
        while link is not None:
            link.__traceback__ = None
            link = link.__cause__ or link.__context__
        return self


class PermanentError(RequestError):
    """Retrying cannot help: the worker replies with the error and terminates the message."""


class InvalidInputError(PermanentError):
    """The request is undecodable or its tensors do not match the model."""

    code = "invalid_input"


class TooLargeError(PermanentError):
    """The request is over a size, shape or batch limit."""

    code = "too_large"


class DeadlineExceededError(PermanentError):
    """The request's deadline passed before it could run."""

    code = "deadline_exceeded"


class UnknownModelError(PermanentError):
    """No worker serves (or ever registered) the requested model."""

    code = "unknown_model"


class ReplyRefusedError(PermanentError):
    """The NATS server refused to deliver the reply (no permission to publish to its subject).

    No client sees this code (the reply cannot reach it): the request goes to the DLQ with it.
    """

    code = "reply_refused"


class RetryableError(RequestError):
    """A transient failure: the worker naks the message with a growing delay."""


class BackendError(RetryableError):
    """The inference backend failed (an exception, out of memory)."""

    code = "internal"


class RequestTimeoutError(JetinferError, TimeoutError):
    """No reply arrived within the client's timeout."""

    def __init__(self, request_id: str, timeout_s: float) -> None:
        super().__init__(f"no reply to request {request_id!r} within {timeout_s:g} s")
        self.request_id = request_id
        self.timeout_s = timeout_s


class JobStalledError(JetinferError, TimeoutError):
    """A batch job (`jetinfer video`) got no reply for `timeout_s` while frames were waiting for one.

    The frames stay where they are (requests in INFER, answers in RESULTS): running the same job
    again resumes it.
    """

    def __init__(self, job: str, timeout_s: float, waiting_for: str, answered: int) -> None:
        super().__init__(
            f"job {job}: no reply for {timeout_s:g} s while waiting for {waiting_for}; {answered} frames "
            "answered so far. Re-run the same command to resume (answered frames are not sent again)"
        )
        self.job = job
        self.timeout_s = timeout_s
        self.waiting_for = waiting_for
        self.answered = answered


class SettingsError(JetinferError, ValueError):
    """A setting is invalid. `setting` is its name (the flag without dashes)."""

    def __init__(self, setting: str, message: str) -> None:
        flag = "--" + setting.replace("_", "-")
        env = "JETINFER_" + setting.upper()
        super().__init__(f"invalid setting {setting} ({flag} / {env}): {message}")
        self.setting = setting
        self.message = message


class StreamMismatchError(JetinferError):
    """An existing JetStream stream or consumer differs from the configuration jetinfer needs."""

    def __init__(self, name: str, field: str, existing: object, wanted: object) -> None:
        super().__init__(
            f"{name}: existing {field}={existing!r} but jetinfer is configured for {field}={wanted!r}; "
            f"change the setting to match, or delete and recreate {name}"
        )
        self.name = name
        self.field = field
        self.existing = existing
        self.wanted = wanted


class StreamMissingError(JetinferError):
    """A JetStream stream this process only reads does not exist (workers create the streams)."""

    def __init__(self, name: str, hint: str) -> None:
        super().__init__(f"stream {name} does not exist: {hint}")
        self.name = name


class StreamUpdateError(JetinferError, RuntimeError):
    """Adding this process's subjects to a stream kept losing to concurrent updates."""


class EmbeddedServerError(JetinferError, RuntimeError):
    """The embedded nats-server (the demo's, the embedded bench's) exited or never became ready."""


class FrontProcessError(JetinferError, RuntimeError):
    """A worker's front process (`--fronts`) did not start, or did not connect to NATS in time."""


class ExportError(JetinferError, RuntimeError):
    """Exporting a model (the demo classifier) into a repository failed."""


class RepositoryError(JetinferError):
    """A model repository entry (config, manifest, version folder) is invalid."""

    def __init__(self, path: object, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class ModelLoadError(JetinferError):
    """A backend could not load a model version."""


_CODES: dict[str, type[RequestError]] = {
    cls.code: cls
    for cls in (
        InvalidInputError,
        TooLargeError,
        DeadlineExceededError,
        UnknownModelError,
        ReplyRefusedError,
        BackendError,
    )
}


def error_for_code(code: str, message: str) -> RequestError:
    """The request error class that a wire error `code` stands for (unknown codes become `internal`)."""
    cls = _CODES.get(code, BackendError)
    return cls(message)
