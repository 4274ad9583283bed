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
    pass


class Unauthenticated(DomainError):
    pass


class PermissionDenied(DomainError):
    pass


class Unavailable(DomainError):
    """A dependency (PostgreSQL, another service) cannot be reached; retry later."""
