"""What the fuzzer sends: hypothesis strategies built from the Coordinator service's protobuf
descriptors and from the HTTP route list in crowdtrain.coordinator.api.webserver's docstring.

Nothing here knows a field by name: a field added to a request message, or a route added to the
docstring, is fuzzed on its own. Values favour the edges where servers break: huge, unicode,
control and path-like strings, integers at every width's limits, NaN/inf doubles, raw garbage bytes.
`Hints` carries the few values that reach deeper code (a published step, real file names).
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse

from crowdtrain.protos import coordinator_pb2 as pb
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from hypothesis import strategies as st

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]
METHODS: tuple[MethodDescriptor, ...] = tuple(SERVICE.methods)

# strings that have broken servers before: traversal, NUL, terminal escapes, SQL, markup, RTL,
# unicode digits (int('²') fails, '٣'.isdigit() is True), phases and names the code compares with
SPECIAL_TEXT = (
    "",
    " ",
    ".",
    "..",
    "../",
    "../../etc/passwd",
    "/etc/passwd",
    "..\\..\\windows",
    "%2e%2e%2f",
    "\x00",
    "a\x00b",
    "\r\n",
    "\n2026-01-01 INFO forged log line",
    "\x1b[2J\x1b[31mred",
    "%s%n%x",
    "' OR 1=1 --",
    "'); DROP TABLE peers; --",
    "<script>alert(1)</script>",
    "\u202eevil",
    "\ufeff",
    "😀",
    "²",
    "٣",
    "Ⅻ",
    "ﬁ",
    "0",
    "-1",
    "nan",
    "latest",
    "crowdtrain.json",
    "training",
    "joining",
    "loading_state",
    "dht:",
)
# how often a short string is repeated (a whole request past gRPC's 4 MiB receive limit: `raw`)
REPEATS = (2, 2, 64, 64, 4096, 70_000)
BIG_INTS = (0, 1, -1, 2, 3, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**62, 2**63 - 1)
DOUBLES = (0.0, -0.0, 1.0, -1.0, 1e-308, 5e-324, 1e308, -1e308, float("nan"), float("inf"), float("-inf"))
# (lowest, highest) of each protobuf integer type
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


@dataclasses.dataclass(frozen=True)
class Hints:
    """Values of the live coordinator that let fuzzed requests get past the first check."""

    texts: tuple[str, ...] = ()  # file names, shard names, static files
    ints: tuple[int, ...] = ()  # published steps, file sizes


def text(hints: Hints = Hints()) -> st.SearchStrategy[str]:
    short = st.one_of(
        st.sampled_from(hints.texts or SPECIAL_TEXT),
        st.sampled_from(SPECIAL_TEXT),
        st.text(max_size=16),
        st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=16),
    )
    return st.one_of(
        st.sampled_from(hints.texts or SPECIAL_TEXT),
        st.sampled_from(hints.texts or SPECIAL_TEXT),
        short,
        st.builds(lambda s, n: (s or "x") * n, short, st.sampled_from(REPEATS)),
        st.builds(lambda a, b: a + b, short, short),
    )


def integer(low: int, high: int, hints: Hints = Hints()) -> st.SearchStrategy[int]:
    edges = [v for v in (*BIG_INTS, *(-v for v in BIG_INTS), low, high, *hints.ints) if low <= v <= high]
    return st.one_of(st.sampled_from(sorted(set(edges))), st.integers(low, high))


def double() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(DOUBLES), st.floats(allow_nan=True, allow_infinity=True))


def _scalar(field: FieldDescriptor, hints: Hints, depth: int) -> st.SearchStrategy:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return text(hints)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind in _INT_RANGES:
        return integer(*_INT_RANGES[kind], hints)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return double() if kind == FieldDescriptor.TYPE_DOUBLE else st.floats(width=32)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return message_fields(field.message_type, hints, depth + 1)
    raise ValueError(f"field {field.full_name} has a type the fuzzer does not know ({kind}); add it here")


def _field(field: FieldDescriptor, hints: Hints, depth: int) -> st.SearchStrategy:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(_scalar(key, hints, depth), _scalar(value, hints, depth), max_size=4)
    if field.is_repeated:
        return st.lists(_scalar(field, hints, depth), max_size=5)
    return _scalar(field, hints, depth)


def message_fields(descriptor: Descriptor, hints: Hints = Hints(), depth: int = 0) -> st.SearchStrategy[dict]:
    """Keyword arguments for `descriptor`'s message class: any subset of its fields, fuzzed."""
    if depth > 3:
        return st.just({})
    optional = {f.name: _field(f, hints, depth) for f in descriptor.fields}
    return st.fixed_dictionaries({}, optional=optional)


def message_class(descriptor: Descriptor):
    return message_factory.GetMessageClass(descriptor)


@dataclasses.dataclass(frozen=True)
class GrpcCall:
    """One call of `method`: its request messages' fields (several for a client stream), or raw
    bytes sent as the serialized request; `credentials` picks a joined session (index) whose
    credential fields overwrite the request's, so calls reach past the session check."""

    method: str
    requests: tuple[dict, ...] = ()
    raw: bytes | None = None
    credentials: int | None = None


def grpc_call(hints: Hints = Hints()) -> st.SearchStrategy[GrpcCall]:
    def for_method(method: MethodDescriptor) -> st.SearchStrategy[GrpcCall]:
        fields = message_fields(method.input_type, hints)
        requests = (
            st.lists(fields, min_size=0, max_size=4) if method.client_streaming else fields.map(lambda f: [f])
        )
        structured = st.builds(
            lambda r, c: GrpcCall(method.name, tuple(r), None, c),
            requests,
            st.one_of(st.none(), st.integers(0, 1 << 16)),
        )
        # raw bytes; now and then past gRPC's 4 MiB default receive limit
        raw = st.builds(
            lambda b, n: GrpcCall(method.name, (), b * max(1, n // len(b)), None),
            st.binary(min_size=1, max_size=48),
            st.sampled_from((1,) * 27 + (1000, 100_000, 4_300_000)),
        )
        return st.one_of(structured, structured, structured, raw)

    return st.one_of(*(for_method(m) for m in METHODS))


# ---------------------------------------------------------------------------------------------- HTTP

METHOD_NAMES = (
    "GET",
    "GET",
    "GET",
    "GET",
    "HEAD",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "OPTIONS",
    "PATCH",
    "TRACE",
    "CONNECT",
    "get",
    "G\x00T",
    "X" * 5000,
)
VERSIONS = ("HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.1x", "")
RANGES = (
    "bytes=0-",
    "bytes=0-0",
    "bytes=1-2",
    "bytes=-1",
    "bytes=-0",
    "bytes=5-2",
    "bytes=0-1,2-3",
    "bytes=" + "9" * 4300 + "-",
    "bytes=-" + "9" * 4300,
    "bytes=²-",
    "bytes=٣-",
    "bytes=-",
    "bytes=",
    "items=0-1",
    "bytes=0-18446744073709551616",
    "bytes= 1-2",
)
SEGMENTS = (
    "..",
    ".",
    "%2e%2e",
    "%2E%2E%2F",
    "..%2f..%2fetc%2fpasswd",
    "%00",
    "%ff",
    "\x00",
    "¹",
    "٣",
    "9" * 4300,
    "-1",
    "0",
    "latest",
    "%",
    "%zz",
    "a b",
    "\t",
    "x" * 70_000,
)


def route_templates(doc: str) -> tuple[str, ...]:
    """The GET paths listed in a docstring, e.g. '/checkpoints/<step|latest>/<file>'."""
    routes = tuple(re.findall(r"^\s+GET (/\S*)", doc, re.MULTILINE))
    if not routes:
        raise ValueError(
            "no '    GET /path' lines in the web server's docstring: the fuzzer reads its routes there"
        )
    return routes


@dataclasses.dataclass(frozen=True)
class HttpRequest:
    wire: bytes  # the whole request as sent
    route: str  # the template it came from (or "raw")


def _fill(template: str, segments: list[str]) -> str:
    it = iter(segments)
    return re.sub(r"<[^>]*>", lambda m: next(it, "x"), template)


def _quote(value: str, how: str) -> str:
    return {
        "raw": value,
        "quoted": urllib.parse.quote(value, safe=""),
        "plus": urllib.parse.quote_plus(value),
    }[how]


def http_request(routes: tuple[str, ...], hints: Hints = Hints()) -> st.SearchStrategy[HttpRequest]:
    any_text = text(hints)
    segment = st.one_of(st.sampled_from(SEGMENTS + hints.texts), any_text)
    quoting = st.sampled_from(("raw", "quoted", "quoted", "plus"))
    templates = st.sampled_from(routes)
    mutations = st.sampled_from(("none", "none", "none", "extra", "double", "trailing", "absolute"))
    trailers = st.sampled_from(("/", "/.", "/..", "%20", ";x"))
    extra_headers = st.lists(
        st.sampled_from(("range", "huge", "many", "nul", "length", "chunked", "expect")),
        max_size=3,
        unique=True,
    )
    ranges = st.one_of(st.sampled_from(RANGES), any_text)
    huge = st.sampled_from((8_000,) * 10 + (70_000, 1_000_000))
    many = st.sampled_from((100, 1000))
    methods, versions, bodies = (
        st.sampled_from(METHOD_NAMES),
        st.sampled_from(VERSIONS),
        st.binary(max_size=32),
    )

    @st.composite
    def build(draw) -> HttpRequest:
        template = draw(templates)
        segments = [_quote(draw(segment), draw(quoting)) for _ in range(template.count("<"))]
        path = _fill(template, segments)
        mutation = draw(mutations)
        if mutation == "extra":
            path = path.rstrip("/") + "/" + _quote(draw(segment), draw(quoting))
        elif mutation == "double":
            path = path.replace("/", "//", 1)
        elif mutation == "trailing":
            path += draw(trailers)
        elif mutation == "absolute":
            path = "http://127.0.0.1" + path
        if draw(st.booleans()):
            path += "?" + _quote(draw(any_text), draw(quoting)) + "=" + _quote(draw(any_text), draw(quoting))
        method = draw(methods)
        headers = [("Host", "127.0.0.1"), ("Connection", "close")]
        extras = draw(extra_headers)
        if "range" in extras:
            headers.append(("Range", draw(ranges)))
        if "huge" in extras:
            headers.append(("X-Fuzz", "y" * draw(huge)))
        if "many" in extras:
            headers += [(f"X-F{i}", "1") for i in range(draw(many))]
        if "nul" in extras:
            headers.append(("X-Nul", "a\x00\r\nInjected: 1"))
        if "expect" in extras:
            headers.append(("Expect", "100-continue"))
        body = b"" if method in ("GET", "HEAD") else draw(bodies)
        if "chunked" in extras:
            headers.append(("Transfer-Encoding", "chunked"))
            body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        elif body or "length" in extras:
            headers.append(("Content-Length", str(len(body))))
        head = (
            f"{method} {path} {draw(versions)}".rstrip()
            + "\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers)
        )
        return HttpRequest((head + "\r\n").encode("utf-8") + body, template)

    garbage = st.builds(lambda b: HttpRequest(b + b"\r\n\r\n", "raw"), st.binary(min_size=1, max_size=200))
    return st.one_of(build(), build(), build(), build(), build(), build(), build(), garbage)
