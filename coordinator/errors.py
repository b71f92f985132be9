"""The coordinator's expected failures (all `CrowdtrainError`s, so the CLI prints one line).

`RequestError`s are what a request is refused with; the gRPC servicer maps each class to one status
code in one table (`service.STATUS_CODES`, applied by `grpcserver`), and the HTTP server answers `NotFoundError` with 404.
Domain code raises these, never a `grpc.StatusCode`.
"""

from crowdtrain.peer.errors import CrowdtrainError


class PortInUseError(CrowdtrainError):
    """A port the operator asked for is taken; the message names the flag that picks a free one."""


class RequestError(CrowdtrainError):
    """A request the coordinator refuses; the message tells the caller what to do instead."""


class NotFoundError(RequestError):
    """What the request names does not exist: a session, a checkpoint, a file of a checkpoint."""


class InvalidRequestError(RequestError):
    """A field of the request is malformed or outside its limit (`coordinator.limits.REQUEST_LIMITS`)."""


class BannedError(RequestError):
    """The operator banned this peer (`crowdtrain ban`); it must stop, not retry."""


class OutOfRangeError(RequestError):
    """A position in a file (a download's resume offset) lies beyond its end."""


class NotServedError(RequestError):
    """This coordinator was started without what the request needs (e.g. no swarm status)."""


class UnauthenticatedError(RequestError):
    """The request lacks its session's secret token (JoinResponse.session_token), or it is wrong."""


class RateLimitedError(RequestError):
    """Too many requests from this address or session; the message says when to retry."""


class IncompatibleError(RequestError):
    """The peer's crowdtrain is older than the run needs; the message is the command that upgrades it."""
