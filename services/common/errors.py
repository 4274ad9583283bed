"""Domain errors: raised anywhere, translated to gRPC status codes once, by the
error interceptor (services.common.grpc_server). Never match on message text."""


class DomainError(Exception):
    """Base class; the message is shown to the client, so make it name the field."""


class InvalidArgument(DomainError):
    pass


class NotFound(DomainError):
    pass


class AlreadyExists(DomainError):
    pass


class FailedPrecondition(DomainError):
    pass


class ResourceExhausted(DomainError):
    """A quota or rate is reached. `retry_after` (seconds), when waiting helps,
    goes to the client as the trailing metadata `retry-after`."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Aborted(DomainError):
    """The call was ended by the server (e.g. an idle stream); open it again."""


class Unauthenticated(DomainError):
    pass


class PermissionDenied(DomainError):
    pass


class Unavailable(DomainError):
    """A dependency (PostgreSQL, another service) cannot be reached; retry later."""
