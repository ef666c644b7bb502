"""Hypothesis strategies that turn the node's OpenAPI document into HTTP requests, well-formed and not.

Every operation of ``openapi_document()`` becomes a source of requests: path, query and header parameters
drawn from their schemas (or from a list of nasty strings, or of the wrong type), and bodies drawn from the
request body's schema, from a known-good example with some fields replaced, or from outright malformations:
broken or truncated JSON, wrong types, huge strings, deep nesting, lone surrogates and invalid UTF-8, other
content types, bodies over the size limit. The requests are plain data (``FuzzRequest``); ``send`` puts one
on the wire with ``http.client`` so that nothing on the client side repairs or refuses what was drawn.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
BODY_LIMIT = 256 * 1024  # the node's default max_body_bytes

# Strings that have broken parsers, databases, normalisers and templates before.
NASTY = (
    "",
    " ",
    "\x00",
    "\x00\x01\x1f\x7f",
    "null",
    "undefined",
    "-1",
    "0",
    "1e309",
    "NaN",
    "9" * 40,
    "'; DROP TABLE dossiers; --",
    '" OR 1=1 --',
    "../../../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "%00",
    "%s%s%n",
    "{{7*7}}",
    "<script>alert(1)</script>",
    "\u202e\u0301\u200b\ufeff",
    "Nguye\u0302\u0303n Thi\u0323 La\u0300n",  # Vietnamese in NFD
    "Nguyễn Thị Lan",
    "\U0001d57f\U0001d58a\U0001d598\U0001d599 \U0001f1fb\U0001f1f3 \U0001f469\u200d\U0001f469\u200d\U0001f467",
    "\ud800",  # lone surrogate
    "a\udfffb",
    "\uffff\ufffe",
    "000.00.17.H29-261122-0001",
    "000.00.17.H29-991399-99999999999999999999",
    "*",
    '"' + "0" * 64 + '"',
    "W/\"x\"",
    "x" * 5000,
)

_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(NASTY),
)
ANY_JSON: st.SearchStrategy[Any] = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(NASTY)), inner, max_size=4),
    ),
    max_leaves=12,
)


@dataclass(frozen=True)
class Operation:
    """One method on one path of the document, with what it takes."""

    method: str
    path: str
    parameters: tuple[dict[str, Any], ...]
    body: dict[str, Any] | None  # content type -> media object
    responses: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"

    def documented_content(self, status: int) -> tuple[str, ...]:
        """Content types the document names for ``status`` on this operation (empty when not documented)."""
        response = self.responses.get(str(status)) or {}
        return tuple((response.get("content") or {}).keys())


@dataclass
class FuzzRequest:
    """A drawn request, as data; ``other_address`` sends it from 127.0.0.2 (for wrong tokens and sign-ins)."""

    operation: str
    method: str
    target: str
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    body: bytes | None = None
    other_address: bool = False

    def __repr__(self) -> str:
        return f"FuzzRequest({self.describe()}, from={'127.0.0.2' if self.other_address else '127.0.0.1'})"

    def describe(self) -> str:
        body = self.body if self.body is None or len(self.body) <= 600 else self.body[:600] + b"...(truncated)"
        heads = [(k, v if len(v) < 300 else v[:300] + b"...") for k, v in self.headers]
        return f"{self.method} {self.target[:600]}\nheaders={heads}\nbody={body!r}"


def operations(doc: Mapping[str, Any]) -> list[Operation]:
    out: list[Operation] = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            params = tuple(resolve(doc, p) for p in op.get("parameters", []))
            body = resolve(doc, op["requestBody"]).get("content") if "requestBody" in op else None
            out.append(Operation(method.upper(), path, params, body, op.get("responses", {})))
    return out


def resolve(doc: Mapping[str, Any], node: Any) -> Any:
    """Follow ``$ref`` pointers (local ones only, as the document uses)."""
    while isinstance(node, dict) and "$ref" in node:
        ref = str(node["$ref"])
        assert ref.startswith("#/"), ref
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part]
        node = target
    return node


# --- values from schemas -------------------------------------------------------------------------


def from_schema(doc: Mapping[str, Any], schema: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values the schema describes (types, enums, patterns, bounds, required properties)."""
    schema = resolve(doc, schema)
    if not isinstance(schema, dict) or not schema:
        return ANY_JSON
    if "enum" in schema:
        return st.sampled_from(list(schema["enum"]))
    if "allOf" in schema:
        merged: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
        for part in schema["allOf"]:
            part = resolve(doc, part)
            merged["properties"].update(part.get("properties", {}))
            merged["required"] += part.get("required", [])
        return from_schema(doc, merged, depth)
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of(*(from_schema(doc, {**schema, "type": k}, depth) for k in kind))
    if kind == "object" or "properties" in schema:
        if depth > 3:
            return st.just({})
        props = schema.get("properties", {})
        required = [k for k in schema.get("required", []) if k in props]
        optional = {k: from_schema(doc, v, depth + 1) for k, v in props.items() if k not in required}
        return st.fixed_dictionaries({k: from_schema(doc, props[k], depth + 1) for k in required}, optional=optional)
    if kind == "array":
        return st.lists(from_schema(doc, schema.get("items", {}), depth + 1), max_size=3)
    if kind == "integer":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        return st.integers(min_value=lo, max_value=hi)
    if kind == "number":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        return st.one_of(
            st.integers(min_value=None if lo is None else int(lo), max_value=None if hi is None else int(hi)),
            st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False),
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(re.compile(schema["pattern"]), fullmatch=True)
        return st.text(max_size=int(schema.get("maxLength", 60)))
    return ANY_JSON


def nasty_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(NASTY),
        st.text(max_size=80),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
        st.builds(
            lambda c, n: c * n, st.sampled_from(["a", "ẫ", "\U0001d57f", "%", "/", "\x00"]), st.integers(1, 20_000)
        ),
    )


def mutated(doc: Mapping[str, Any], schema: Any, example: Mapping[str, Any] | None) -> st.SearchStrategy[Any]:
    """A good example with a few fields replaced by schema values, nasty strings or other types, or dropped."""
    schema = resolve(doc, schema)
    props = schema.get("properties", {}) if isinstance(schema, dict) else {}
    base = dict(example or {})
    names = sorted(set(props) | set(base)) or ["x"]

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        body = dict(base)
        for _ in range(draw(st.integers(0, 3))):
            name = draw(st.one_of(st.sampled_from(names), st.text(max_size=10)))
            how = draw(st.sampled_from(["schema", "nasty", "wrong", "drop"]))
            if how == "drop":
                body.pop(name, None)
            elif how == "schema" and name in props:
                body[name] = draw(from_schema(doc, props[name], 1))
            elif how == "nasty":
                body[name] = draw(nasty_text())
            else:
                body[name] = draw(ANY_JSON)
        return body

    return build()


def deep(levels: int, kind: str) -> str:
    if kind == "list":
        return "[" * levels + "]" * levels
    return '{"a":' * levels + "1" + "}" * levels


@st.composite
def json_body(draw: st.DrawFn, doc: Mapping[str, Any], schema: Any, example: Mapping[str, Any] | None) -> bytes:
    """A body for an application/json operation: mostly JSON in some shape, sometimes bytes that are not."""
    shape = draw(
        st.sampled_from(
            ["schema", "example", "example", "example", "mutated", "mutated", "mutated", "mutated", "any", "deep",
             "huge", "broken", "bad-utf8", "empty", "oversize", "bom", "nan"]
        )
    )
    if shape == "schema":
        value = draw(from_schema(doc, schema))
    elif shape == "example":
        value = dict(example or {})
    elif shape == "mutated":
        value = draw(mutated(doc, schema, example))
    elif shape == "any":
        value = draw(ANY_JSON)
    elif shape == "deep":
        levels = draw(st.sampled_from([15, 16, 17, 18, 40, 1000, 100_000]))
        return deep(levels, draw(st.sampled_from(["list", "dict"]))).encode()
    elif shape == "huge":
        value = dict(example or {})
        name = draw(st.sampled_from(sorted(value) or ["x"]))
        value[name] = draw(st.sampled_from(["a", "ẫ", "\\", '"'])) * draw(st.sampled_from([300, 5000, 60_000]))
    elif shape == "broken":
        good = json.dumps(example or {}, ensure_ascii=False).encode()
        cut = draw(st.integers(0, max(0, len(good) - 1)))
        tail = draw(st.sampled_from([b"", b"}", b",", b"\x00", b"]]]", b"garbage", b'"', b"\\"]))
        return good[:cut] + tail
    elif shape == "bad-utf8":
        good = json.dumps(example or {}, ensure_ascii=False).encode()
        at = draw(st.integers(0, len(good)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]))
        return good[:at] + junk + good[at:]
    elif shape == "empty":
        return b""
    elif shape == "oversize":
        return json.dumps({"TrichYeuHoSo": "x" * (BODY_LIMIT + 10)}).encode()
    elif shape == "bom":
        return b"\xef\xbb\xbf" + json.dumps(example or {}, ensure_ascii=False).encode()
    else:  # JSON's non-standard constants, which Python's parser accepts
        value = {**dict(example or {}), draw(st.sampled_from(sorted(example or {"x": 0}))): float("nan")}
    # ensure_ascii=True sends lone surrogates as \ud800 escapes (valid JSON); False sends raw bytes.
    if draw(st.booleans()):
        return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()
    return json.dumps(value, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def multipart_body(draw: st.DrawFn) -> tuple[bytes, str]:
    """(body, content type) for a document upload: well-formed multipart with odd parts, or broken framing."""
    boundary = draw(st.sampled_from(["fuzzboundary", "x", "-" * 60, "ẫ"]))
    parts: list[bytes] = []
    if draw(st.booleans()):
        name = draw(st.one_of(st.sampled_from(["giay-to.pdf", "../../x", "", "a\x00b", "ẫ.pdf"]), st.text(max_size=20)))
        data = draw(st.binary(max_size=2000))
        parts.append(
            f'Content-Disposition: form-data; name="file"; filename="{name}"\r\nContent-Type: application/pdf\r\n\r\n'
            .encode("utf-8", "surrogatepass") + data
        )
    for key in draw(st.lists(st.sampled_from(["TenTepDinhKem", "MaThanhPhanHoSo", "DuocSoHoa", "file", "other"]),
                             max_size=3)):
        value = draw(st.one_of(st.sampled_from(["0", "1", "2", "-1", ""]), nasty_text()))
        head = f'Content-Disposition: form-data; name="{key}"\r\n\r\n'.encode()
        parts.append(head + value.encode("utf-8", "surrogatepass"))
    sep = f"--{boundary}".encode()
    body = b"".join(sep + b"\r\n" + p + b"\r\n" for p in parts) + sep + b"--\r\n"
    if draw(st.integers(0, 4)) == 0:
        body = body[: draw(st.integers(0, len(body)))]  # cut off mid-part
    return body, f"multipart/form-data; boundary={boundary}"


# aiohttp's parser refuses a request line or a header over 8190 bytes (text/plain, before the application):
# drawn requests stay under it; test_protocol_garbage sends longer ones.
MAX_PART = 2000


def _quoted(value: str, raw_bytes: bool = False) -> str:
    """``value`` percent-encoded as UTF-8 (every byte when ``raw_bytes``), at most MAX_PART characters."""
    data = value.encode("utf-8", "surrogatepass")
    text = "".join(f"%{b:02X}" for b in data) if raw_bytes else urllib.parse.quote(data, safe="")
    if len(text) <= MAX_PART:
        return text
    cut = text[:MAX_PART]
    return cut[: cut.rfind("%")] if "%" in cut[-2:] else cut


@st.composite
def fuzz_request(
    draw: st.DrawFn,
    doc: Mapping[str, Any],
    ops: list[Operation],
    examples: Mapping[str, Mapping[str, Any]],
    path_values: Mapping[str, list[str]],
    token: str,
    session: tuple[str, str] | None = None,
) -> tuple[Operation, FuzzRequest]:
    """One request against one operation of the document, with the auth header mostly right.

    ``session`` is a signed-in browser's (cookie, CSRF token): some requests carry the cookie instead of the
    token, with the right CSRF token, a wrong one or none.
    """
    # Operations that take a body are drawn three times as often: that is where the writes are.
    op = draw(st.sampled_from([o for o in ops for _ in range(3 if o.body else 1)]))
    method = op.method if draw(st.integers(0, 9)) else draw(st.sampled_from(METHODS))
    path = op.path
    query: list[tuple[str, str]] = []
    headers: list[tuple[str, bytes]] = []
    for p in op.parameters:
        name, where, schema = p["name"], p["in"], p.get("schema", {})
        if where == "path":
            known = path_values.get(name, [])
            value = draw(st.one_of(st.sampled_from(known), nasty_text(), from_schema(doc, schema).map(str))
                         if known else st.one_of(nasty_text(), from_schema(doc, schema).map(str)))
            path = path.replace("{" + name + "}", _quoted(value, draw(st.integers(0, 9)) == 0) or "%20")
            continue
        if not p.get("required") and draw(st.booleans()):
            continue
        value = draw(st.one_of(from_schema(doc, schema).map(_as_param), nasty_text(), ANY_JSON.map(_as_param)))
        if where == "query":
            query.append((name, value))
        elif where == "header":
            headers.append((name, _header_bytes(value)))
    if draw(st.integers(0, 6)) == 0:
        query.append((draw(st.sampled_from(["x", "limit", "since", "cursor", "debug"])), draw(nasty_text())))
    target = path
    if query:
        target += "?" + "&".join(f"{urllib.parse.quote(k)}={_quoted(v)}" for k, v in query[:3])
        if draw(st.integers(0, 9)) == 0:
            target += draw(st.sampled_from(["&%ZZ", "&a=%FF%FE", "&&&", "&=", "&limit=1&limit=2"]))

    body: bytes | None = None
    content_type: str | None = None
    media = op.body or {}
    if "application/json" in media or (method in {"POST", "PATCH", "PUT"} and draw(st.booleans())):
        schema = (media.get("application/json") or {}).get("schema", {})
        example = examples.get(op.label)
        body = draw(json_body(doc, schema, example))
        content_type = "application/json"
    elif "multipart/form-data" in media:
        body, content_type = draw(multipart_body())
    elif "application/x-www-form-urlencoded" in media:
        form = draw(st.dictionaries(st.sampled_from(["token", "csrf", "next", "x"]), nasty_text(), max_size=3))
        body = urllib.parse.urlencode({k: v.encode("utf-8", "surrogatepass") for k, v in form.items()}).encode()
        content_type = "application/x-www-form-urlencoded"
    if draw(st.integers(0, 5)) == 0:
        content_type = draw(
            st.sampled_from(
                [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=zz",
                 "application/json; charset=utf-16", "APPLICATION/JSON", "application/json-patch+json", "*/*",
                 "application/octet-stream", "ẫ/ẫ", "application/json; boundary=\x01"]
            )
        )
    if content_type is not None:
        headers.append(("Content-Type", _header_bytes(content_type)))

    auth = draw(st.sampled_from(["valid"] * 8 + ["none", "wrong", "malformed"] + ["cookie"] * 2 * bool(session)))
    other = auth == "wrong" or op.path == "/login"
    if auth == "valid":
        headers.append(("Authorization", f"Bearer {token}".encode()))
    elif auth == "wrong":
        headers.append(("Authorization", b"Bearer " + _header_bytes(draw(st.sampled_from(["wst_", "wst_x" * 50])) +
                                                                    draw(st.text(max_size=40)))))
    elif auth == "malformed":
        malformed = ["Bearer", "Basic dXNlcjpwYXNz", "Bearer   ", token, "bearer\t" + token]
        headers.append(("Authorization", _header_bytes(draw(st.sampled_from(malformed)))))
    elif auth == "cookie" and session is not None:
        cookie, csrf = session
        headers.append(("Cookie", f"wardsync_session={cookie}".encode()))
        # Never the right token to /logout: that would end the session the rest of the run draws from.
        right = st.nothing() if op.path == "/logout" else st.just(csrf)
        sent = draw(st.one_of(st.none(), right, nasty_text()))
        if sent is not None:
            headers.append(("X-CSRF-Token", _header_bytes(sent)))
    if draw(st.integers(0, 9)) == 0:
        headers.append(("Accept", draw(st.sampled_from([b"text/html", b"application/pdf", b"*/*", b"\xff"]))))
    return op, FuzzRequest(op.label, method, target, headers, body, other)


def _as_param(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _header_bytes(value: str) -> bytes:
    """A header value as bytes a conforming HTTP parser must take: control characters (which end the header
    or get the whole request refused before the application sees it, see test_protocol_garbage) become spaces.
    """
    return _CONTROL.sub(" ", value).encode("utf-8", "surrogatepass")[:MAX_PART]


# --- the wire -------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def content_type(self) -> str:
        return str(self.headers.get("Content-Type", "")).split(";")[0].strip().lower()


def send(host: str, port: int, req: FuzzRequest, *, timeout: float = 30.0) -> Answer:
    """Send ``req`` as drawn (no client-side checks or fixes) on a new connection; return the answer."""
    source = ("127.0.0.2", 0) if req.other_address else None
    conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=source)
    try:
        conn.putrequest(req.method, req.target, skip_host=False, skip_accept_encoding=True)
        for name, value in req.headers:
            conn.putheader(name, value)
        if req.body is not None:
            conn.putheader("Content-Length", str(len(req.body)))
        conn.endheaders(req.body)
        resp = conn.getresponse()
        return Answer(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def error_envelope_problem(answer: Answer) -> str | None:
    """What is wrong with a 4xx answer's body, or None when it is the JSON error envelope."""
    if answer.content_type != "application/json":
        return f"content type {answer.content_type!r}, not application/json"
    try:
        body = json.loads(answer.body)
    except ValueError as exc:
        return f"body is not JSON: {exc}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "no 'error' object"
    for key in ("code", "message"):
        if not isinstance(error.get(key), str) or not error[key]:
            return f"error.{key} missing or empty"
    return None
