"""Every gRPC call through `callbudget` before it is served: a grpc.aio server interceptor. No torch.

The interceptor re-registers each method (the Coordinator's, health's, reflection's) as one that
reads its own requests, so that it runs when the call opens, not after a unary request arrives:
then it takes the caller address's rate-limit token, gives the call a WAITING slot, reads the
first message within `first_message_timeout_s` (else DEADLINE_EXCEEDED), moves the call to its
pool and only then runs the real handler with that message. A call the budget ends early (pushed
out while silent, replaced by a newer stream of its session) is answered with a status saying so.

`accept_session` is how the servicer's adapter tells the gate that a HeartbeatStream's first
message named a valid session (the gate cannot read sessions itself).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging

import grpc
from crowdtrain.coordinator.errors import RateLimitedError
from crowdtrain.coordinator.flood.callbudget import CallBudget, Pool, Ticket
from crowdtrain.coordinator.flood.ratelimit import caller_key
from crowdtrain.protos import coordinator_pb2 as pb

logger = logging.getLogger(__name__)

_SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
# method -> (pool once its request is read, None: answered at once or by `accept_session`;
# rate group, None: no per-address rate here, see `callbudget`)
METHODS: dict[str, tuple[Pool | None, str | None]] = {
    f"/{_SERVICE}/Join": (Pool.OPEN_CALL, None),  # the servicer limits joins per address itself
    f"/{_SERVICE}/Heartbeat": (None, None),
    f"/{_SERVICE}/HeartbeatStream": (None, None),  # SESSION_STREAM once accepted
    f"/{_SERVICE}/Leave": (None, None),
    f"/{_SERVICE}/ListCheckpoints": (Pool.OPEN_CALL, "listings"),
    f"/{_SERVICE}/GetStatus": (Pool.OPEN_CALL, "status"),
    f"/{_SERVICE}/CheckReachability": (Pool.OPEN_CALL, "reachability"),
    f"/{_SERVICE}/DownloadCheckpointFile": (Pool.OPEN_STREAM, "downloads"),
}
GROUP_NAMES = {
    "listings": "ListCheckpoints calls",
    "status": "GetStatus calls",
    "downloads": "checkpoint downloads",
    "reachability": "CheckReachability calls",
    "other": "calls",
}

_current: contextvars.ContextVar[tuple[CallBudget, Ticket] | None] = contextvars.ContextVar(
    "crowdtrain_call_ticket", default=None
)


def accept_session(session_id: str) -> None:
    """Called by a HeartbeatStream handler once the servicer accepted its first message: the
    stream takes a session slot; RateLimitedError (RESOURCE_EXHAUSTED) when there is none."""
    current = _current.get()
    if current is None:  # not served through a gate
        return
    budget, ticket = current
    ok, why = budget.accept_session(ticket, session_id)
    if not ok:
        raise RateLimitedError(why)


def classify(method: str, handler: grpc.RpcMethodHandler) -> tuple[Pool | None, str | None]:
    """The pool and rate group of `method`; another service's by the shape of its responses."""
    if method in METHODS:
        return METHODS[method]
    return (Pool.OPEN_STREAM if handler.response_streaming else Pool.OPEN_CALL), "other"


async def _chain(first, rest):
    yield first
    async for request in rest:
        yield request


class CallGate(grpc.aio.ServerInterceptor):
    """Applies one server's `CallBudget` to every call (see the module docstring)."""

    def __init__(self, budget: CallBudget):
        self.budget = budget
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(method, handler))
            self._wrapped[method] = cached
        return cached[1]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` as a request-streaming handler that passes through `_serve` first."""
        pool, group = classify(method, handler)
        behavior = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        )
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            raise TypeError(f"{method}: only async handlers can be served through the call gate")
        streaming_in = handler.request_streaming

        async def run(first, requests, context):
            result = behavior(_chain(first, requests) if streaming_in else first, context)
            if not inspect.isasyncgen(result):
                return await result
            async for response in result:
                await context.write(response)

        async def unary_response(requests, context):
            return await self._serve(requests, context, pool, group, run)

        async def stream_response(requests, context):
            await self._serve(requests, context, pool, group, run)

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                stream_response, handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_unary_rpc_method_handler(
            unary_response, handler.request_deserializer, handler.response_serializer
        )

    async def _serve(self, requests, context, pool: Pool | None, group: str | None, run):
        key = caller_key(context.peer())
        allowed, retry_s = self.budget.rate(group, key)
        if not allowed:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many {GROUP_NAMES[group]} from {key}; retry in {retry_s:.1f}s",
            )
        ticket = self.budget.open(key, asyncio.current_task().cancel)
        reset = _current.set((self.budget, ticket))
        try:
            first = await self._first_message(requests, context)
            ok, why = self.budget.move(ticket, pool)
            if not ok:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
            return await run(first, requests, context)
        except asyncio.CancelledError:
            if not ticket.end_reason:  # the client went away, or the server stops
                raise
            asyncio.current_task().uncancel()
            if context.done():  # the client's deadline passed meanwhile: a status now fails in gRPC's core
                return None
            code = grpc.StatusCode.ABORTED if ticket.session_id else grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, f"ended by the coordinator: {ticket.end_reason}")
        finally:
            self.budget.close(ticket)
            _current.reset(reset)

    async def _first_message(self, requests, context):
        timeout_s = self.budget.limits.first_message_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await anext(aiter(requests))
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no request message within {timeout_s:g}s of opening the call; send it with the call",
            )
        except StopAsyncIteration:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the call was half-closed before its request message"
            )
