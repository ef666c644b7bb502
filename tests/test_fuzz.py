"""Fuzzing the HTTP API from its OpenAPI description, against a real node process on loopback.

The node (``python -m node serve``) replicates to both stand-ins, each its own process, and holds a few
dossiers made through the API, so that requests drawn from ``openapi_document()`` (see tests/fuzz_openapi.py)
reach real codes, documents and targets. Most requests carry an all-roles token; some none, a malformed
header or a wrong token (those, and sign-ins, come from 127.0.0.2 so that the failure limiter does not shut
out 127.0.0.1). Every answer must be below 500; every 4xx the JSON error envelope with a code and a message
(unless the document names another content type for it, as for the HTML sign-in page); every JSON answer
must parse. Afterwards the node still answers /readyz, logged no unhandled exception, and its store passes
``PRAGMA integrity_check`` and ``wardsync audit verify``.

WARDSYNC_FUZZ_EXAMPLES sets the slow run's number of requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.config import render_config
from node.openapi import openapi_document
from tests.conftest import AGENCY, UNIT, provision_token, valid_intake
from tests.fuzz_openapi import (
    Answer,
    FuzzRequest,
    Operation,
    error_envelope_problem,
    fuzz_request,
    operations,
    resolve,
    send,
)

HOST = "127.0.0.1"
QUICK_EXAMPLES = 150
SLOW_EXAMPLES = int(os.environ.get("WARDSYNC_FUZZ_EXAMPLES", "3000"))
START_TIMEOUT_S = 30.0

# Known-good bodies: mutating one gets past validation into the service, the store and the replicators.
EXAMPLES: dict[str, dict[str, Any]] = {
    "POST /api/v1/dossiers": valid_intake(),
    "POST /api/v1/dossiers/{code}/steps": {"TrangThai": 4, "NguoiXuLy": "Lê Văn Tâm", "NoiDungXuLy": "Thụ lý"},
    "POST /api/v1/dossiers/{code}/fees": {"TenPhiLePhi": "Lệ phí", "MaPhiLePhi": "LP01", "Gia": 8000, "HinhThucThu": 1},
    "PATCH /api/v1/dossiers/{code}": {"ChuHoSo": "Nguyễn Văn Bình", "SoDienThoai": "0912345679"},
    "POST /api/v1/admin/failover": {"primary": "auto"},
    "POST /api/v1/admin/faults": {"target": "national", "mode": "latency", "seconds": 0.5, "ms": 5},
}


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("WARDSYNC_")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    """The running node and what the fuzzer may aim at."""

    port: int
    token: str
    config: Path
    db: Path
    stderr: Path
    path_values: dict[str, list[str]] = field(default_factory=dict)
    session: tuple[str, str] | None = None  # a signed-in browser's (cookie, CSRF token)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def call(self, method: str, path: str, body: Any = None, **headers: str) -> Answer:
        heads = [("Authorization", f"Bearer {self.token}".encode())]
        heads += [(k.replace("_", "-"), v.encode()) for k, v in headers.items()]
        raw = None
        if body is not None:
            raw = json.dumps(body, ensure_ascii=False).encode()
            heads.append(("Content-Type", b"application/json"))
        return send(HOST, self.port, FuzzRequest("setup", method, path, heads, raw))

    def node_log(self) -> str:
        return self.stderr.read_text(errors="replace")


def _start_standin(system: str, root: Path) -> tuple[subprocess.Popen[bytes], str]:
    out = root / f"{system}.out"
    with out.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "node", "sim", system, "--listen", f"{HOST}:0", "--data-dir", str(root / system)],
            stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.DEVNULL, env=child_env(), cwd=root,
        )
    return proc, str(out)


def _wait_url(proc: subprocess.Popen[bytes], out: str) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = re.search(r"listening on (http://\S+)", Path(out).read_text(errors="replace"))
        if found:
            return found.group(1)
        assert proc.poll() is None, f"stand-in exited with {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError("stand-in did not announce itself")


def _wait_ready(target: Target, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"node exited with {proc.returncode}\n{target.node_log()[-3000:]}"
        with contextlib.suppress(OSError):
            if send(HOST, target.port, FuzzRequest("readyz", "GET", "/readyz"), timeout=5).status == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"node not ready\n{target.node_log()[-3000:]}")


def _upload(target: Target, code: str) -> str:
    boundary = "setupboundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"giay-to.pdf\"\r\n"
        f"Content-Type: application/pdf\r\n\r\n%PDF-1.4 fuzz\r\n--{boundary}--\r\n"
    ).encode()
    heads = [("Authorization", f"Bearer {target.token}".encode()),
             ("Content-Type", f"multipart/form-data; boundary={boundary}".encode())]
    answer = send(HOST, target.port, FuzzRequest("setup", "POST", f"/api/v1/dossiers/{code}/documents", heads, body))
    assert answer.status == 201, answer.body
    documents = json.loads(answer.body)["TaiLieuNop"]
    return str(documents[0]["Sha256"])


def _sign_in(target: Target) -> tuple[str, str]:
    """Sign in as a browser does (form, CSRF cookie, token); the session cookie and the page's CSRF token."""
    form = send(HOST, target.port, FuzzRequest("setup", "GET", "/login"))
    login_csrf = re.search(r"wardsync_login_csrf=([^;]+)", form.headers.get("Set-Cookie", ""))
    assert form.status == 200 and login_csrf, form.headers
    body = urllib.parse.urlencode({"csrf": login_csrf.group(1), "token": target.token, "next": "/"}).encode()
    heads = [("Content-Type", b"application/x-www-form-urlencoded"),
             ("Cookie", f"wardsync_login_csrf={login_csrf.group(1)}".encode())]
    # From 127.0.0.1, which the fuzzer never makes fail a sign-in (those come from 127.0.0.2), so never blocked.
    signed = send(HOST, target.port, FuzzRequest("setup", "POST", "/login", heads, body))
    cookie = re.search(r"wardsync_session=([^;]+)", signed.headers.get("Set-Cookie", ""))
    assert signed.status == 303 and cookie, (signed.status, signed.body[:300])
    with_cookie = [("Cookie", f"wardsync_session={cookie.group(1)}".encode())]
    page = send(HOST, target.port, FuzzRequest("setup", "GET", "/", with_cookie))
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.body.decode())
    assert page.status == 200 and csrf, page.status
    return cookie.group(1), csrf.group(1)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("fuzz")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        national, nat_out = _start_standin("national", root)
        city, city_out = _start_standin("city", root)
        procs += [national, city]
        port = free_port()
        config = root / "wardsync.toml"
        config.write_text(
            render_config(
                unit=UNIT, agency_code=AGENCY, listen=f"{HOST}:{port}", data_dir=str(root / "data"),
                national_url=_wait_url(national, nat_out), city_url=_wait_url(city, city_out),
            ),
            encoding="utf-8",
        )
        config.chmod(0o600)  # it holds the stand-ins' credentials
        token = provision_token(config)
        stderr = root / "node.err"
        with stderr.open("wb") as err:
            node = subprocess.Popen(
                [sys.executable, "-m", "node", "serve", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=child_env(), cwd=root,
            )
        procs.append(node)
        t = Target(port, token, config, root / "data" / "wardsync.sqlite3", stderr, procs=procs)
        _wait_ready(t, node)

        codes = []
        for i in range(3):
            answer = t.call("POST", "/api/v1/dossiers", valid_intake(TrichYeuHoSo=f"Hồ sơ mẫu {i}"))
            assert answer.status == 201, answer.body
            codes.append(str(json.loads(answer.body)["MaHoSo"]))
        assert t.call("POST", f"/api/v1/dossiers/{codes[0]}/steps", EXAMPLES["POST /api/v1/dossiers/{code}/steps"]
                      ).status == 201
        t.path_values = {
            "code": codes,
            "sha256": [_upload(t, codes[1])],
            "target": ["national", "city"],
            "name": ["dashboard.css", "dashboard.js", "fleet.js", "../app.py"],
        }
        t.session = _sign_in(t)
        yield t
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def check_answer(ops: dict[str, Operation], op: Operation, req: FuzzRequest, answer: Answer) -> None:
    """No 5xx; a 4xx carries the JSON error envelope unless documented otherwise; JSON answers parse."""
    where = f"{req.method} {op.path} answered {answer.status}\n{req.describe()}\nanswer: {answer.body[:800]!r}"
    assert answer.status < 500, where
    if req.method == "HEAD":
        return
    if 400 <= answer.status < 500:
        # What the document says of this status for the method actually sent (drawn methods vary).
        actual = ops.get(f"{req.method} {op.path}")
        documented = actual.documented_content(answer.status) if actual is not None else ()
        if documented and "application/json" not in documented and answer.content_type in documented:
            return
        problem = error_envelope_problem(answer)
        assert problem is None, f"{problem}: {where}"
    elif answer.content_type == "application/json":
        json.loads(answer.body)


def parser_refusal(line: str) -> bool:
    """A log line of aiohttp's HTTP parser refusing bytes that are not HTTP (logged before any handler runs)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    exception = str(entry.get("exception", ""))
    return (
        str(entry.get("event", "")).startswith("Error handling request")
        and "in data_received" in exception
        and "aiohttp.http_exceptions." in exception
    )


def check_node_afterwards(target: Target) -> None:
    """The node is up and ready, logged no unhandled exception, and its store and audit log are intact."""
    ready = send(HOST, target.port, FuzzRequest("readyz", "GET", "/readyz"))
    assert ready.status == 200, ready.body
    unhandled = [line for line in target.node_log().splitlines() if "Traceback" in line and not parser_refusal(line)]
    assert not unhandled, "\n".join(unhandled[-5:])[-6000:]
    with contextlib.closing(sqlite3.connect(f"{target.db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    verified = subprocess.run(
        [sys.executable, "-m", "node", "audit", "verify", "--config", str(target.config)],
        capture_output=True, text=True, timeout=60, env=child_env(), cwd=target.config.parent, check=False,
    )
    assert verified.returncode == 0, verified.stderr


def fuzz(target: Target, examples: int) -> dict[str, int]:
    """Send ``examples`` drawn requests; returns how many answers each status got."""
    doc = openapi_document()
    ops = operations(doc)
    by_label = {op.label: op for op in ops}
    seen: dict[str, int] = {}

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(data=st.data())
    def one(data: st.DataObject) -> None:
        drawn = fuzz_request(doc, ops, EXAMPLES, target.path_values, target.token, target.session)
        op, req = data.draw(drawn, label="request")
        answer = send(HOST, target.port, req)
        key = f"{answer.status}"
        seen[key] = seen.get(key, 0) + 1
        check_answer(by_label, op, req, answer)

    one()
    return seen


class TestFuzzOpenApi:
    """Requests drawn from the OpenAPI document never get a 5xx and never hurt the node."""

    def test_drawn_requests(self, target: Target) -> None:
        served = target.call("GET", "/openapi.json")
        assert served.status == 200 and json.loads(served.body) == openapi_document(), "fuzzing another document"
        started = time.monotonic()
        seen = fuzz(target, QUICK_EXAMPLES)
        print(f"{sum(seen.values())} requests in {time.monotonic() - started:.1f}s: {dict(sorted(seen.items()))}")
        assert any(s.startswith("2") for s in seen), "no drawn request succeeded"
        assert any(s.startswith("4") for s in seen), "no drawn request was refused"
        check_node_afterwards(target)

    @pytest.mark.slow
    @pytest.mark.timeout(1800)
    def test_many_drawn_requests(self, target: Target) -> None:
        started = time.monotonic()
        seen = fuzz(target, SLOW_EXAMPLES)
        print(f"{sum(seen.values())} requests in {time.monotonic() - started:.1f}s: {dict(sorted(seen.items()))}")
        check_node_afterwards(target)


def raw_exchange(port: int, data: bytes, *, wait_s: float = 2.0) -> bytes:
    """Write ``data`` on a fresh connection; read until the node closes it or goes quiet for ``wait_s``."""
    with socket.create_connection((HOST, port), timeout=wait_s) as sock:
        chunks = []
        with contextlib.suppress(OSError):  # includes the timeout of a node waiting for more
            sock.sendall(data)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


# Requests that break HTTP itself: aiohttp's parser refuses them before any handler runs.
GARBAGE: dict[str, bytes] = {
    "not-http": b"GARBAGE\r\n\r\n",
    "tls-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "nul-in-header": b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "control-in-token": b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wst_\x1f\r\n\r\n",
    "long-request-line": b"GET /api/v1/dossiers?cursor=" + b"A" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "long-header": b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
    "many-headers": b"GET /readyz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(500)) + b"\r\n",
    "bad-chunk": b"POST /api/v1/dossiers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "negative-length": b"POST /api/v1/dossiers HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
    "length-and-chunked": b"POST /api/v1/dossiers HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "short-body": b"POST /api/v1/dossiers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n{\"MaTTHC\":",
    "bad-method": b"G\x01T /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute-uri": b"GET http://example.invalid/readyz HTTP/1.1\r\nHost: example.invalid\r\nConnection: close\r\n\r\n",
    "bad-version": b"GET /readyz HTTP/9.9\r\nHost: x\r\n\r\n",
    "bare-lf": b"GET /readyz HTTP/1.1\nHost: x\n\n",
    "obs-fold": b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "utf8-path": "GET /api/v1/dossiers/Nguyễn HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "invalid-utf8-path": b"GET /api/v1/dossiers/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
}


class TestFoundByFuzzing:
    """Requests the fuzzer once answered with a 500, kept as fixed cases."""

    @pytest.mark.parametrize(
        "body", [b'{"\\ud800primary": "auto"}', b'{"\xed\xa0\x80primary": "auto"}'], ids=["escaped", "raw"]
    )
    def test_lone_surrogate_in_a_field_name(self, target: Target, body: bytes) -> None:
        heads = [("Authorization", f"Bearer {target.token}".encode()), ("Content-Type", b"application/json")]
        answer = send(HOST, target.port, FuzzRequest("t", "POST", "/api/v1/admin/failover", heads, body))
        assert answer.status == 422, answer.body
        assert error_envelope_problem(answer) is None, answer.body
        assert "\ud800primary" in json.loads(answer.body)["error"]["fields"]

    @pytest.mark.parametrize("value", [[], {}, ["national"]], ids=["list", "object", "list-of-name"])
    def test_fault_window_target_of_another_type(self, target: Target, value: object) -> None:
        body = {"target": value, "mode": "latency", "seconds": 0.5, "ms": 5}
        answer = target.call("POST", "/api/v1/admin/faults", body)
        assert answer.status == 422, answer.body
        assert "target" in json.loads(answer.body)["error"]["fields"]

    @pytest.mark.parametrize(
        ("content_type", "body"),
        [
            ("multipart/form-data; boundary=zz", b""),
            ("multipart/form-data; boundary=zz", b'--zz\r\nContent-Disposition: form-data; name="token"\r\n\r\nabc'),
            ("multipart/form-data", b"token=abc"),
        ],
        ids=["empty", "cut-off", "no-boundary"],
    )
    def test_broken_form_sign_in(self, target: Target, content_type: str, body: bytes) -> None:
        heads = [("Content-Type", content_type.encode())]
        answer = send(HOST, target.port, FuzzRequest("t", "POST", "/login", heads, body, other_address=True))
        assert answer.status == 400, answer.body
        assert error_envelope_problem(answer) is None, answer.body
        assert json.loads(answer.body)["error"]["code"] == "malformed_form"


class TestMultipartPartHeaders:
    """A control character in a multipart part's headers is a malformed body (400), never a 500."""

    BODY = (b'--fb\r\nContent-Disposition: form-data; name="file"; filename="a\x1fb"\r\n'
            b"Content-Type: application/pdf\r\n\r\n%PDF\r\n--fb--\r\n")

    def test_document_upload(self, target: Target) -> None:
        heads = [("Authorization", f"Bearer {target.token}".encode()),
                 ("Content-Type", b"multipart/form-data; boundary=fb")]
        code = target.path_values["code"][2]
        answer = send(HOST, target.port, FuzzRequest("t", "POST", f"/api/v1/dossiers/{code}/documents", heads,
                                                     self.BODY))
        assert answer.status == 400, answer.body
        assert json.loads(answer.body)["error"]["code"] == "malformed_multipart"

    def test_sign_in_form(self, target: Target) -> None:
        heads = [("Content-Type", b"multipart/form-data; boundary=fb")]
        answer = send(HOST, target.port, FuzzRequest("t", "POST", "/login", heads, self.BODY, other_address=True))
        assert answer.status == 400, answer.body
        assert json.loads(answer.body)["error"]["code"] == "malformed_form"


class TestCsrfTokens:
    """A signed-in browser's CSRF token compared with any text the client sends: unequal is a 403, never a 500."""

    SENT = ("\u202e\u0301", "ẫ" * 40, "")

    @pytest.fixture
    def cookie(self, target: Target) -> str:
        """A fresh session: the fuzzed requests may have signed the module's one out."""
        return _sign_in(target)[0]

    @pytest.mark.parametrize("sent", SENT, ids=["bidi", "vietnamese", "empty"])
    def test_change_with_a_non_ascii_csrf_header(self, target: Target, cookie: str, sent: str) -> None:
        heads = [("Cookie", f"wardsync_session={cookie}".encode()), ("X-CSRF-Token", sent.encode()),
                 ("Content-Type", b"application/json")]
        body = json.dumps(EXAMPLES["POST /api/v1/dossiers/{code}/steps"]).encode()
        code = target.path_values["code"][2]
        answer = send(HOST, target.port, FuzzRequest("t", "POST", f"/api/v1/dossiers/{code}/steps", heads, body))
        assert answer.status == 403, answer.body
        assert json.loads(answer.body)["error"]["code"] == "csrf_failed"

    @pytest.mark.parametrize("sent", SENT, ids=["bidi", "vietnamese", "empty"])
    def test_sign_out_with_a_non_ascii_csrf_field(self, target: Target, cookie: str, sent: str) -> None:
        heads = [("Cookie", f"wardsync_session={cookie}".encode()),
                 ("Content-Type", b"application/x-www-form-urlencoded")]
        body = urllib.parse.urlencode({"csrf": sent}).encode()
        answer = send(HOST, target.port, FuzzRequest("t", "POST", "/logout", heads, body))
        assert answer.status == 403, answer.body
        assert json.loads(answer.body)["error"]["code"] == "csrf_failed"

    def test_sign_in_with_a_non_ascii_form_token(self, target: Target) -> None:
        heads = [("Cookie", b"wardsync_login_csrf=abc"), ("Content-Type", b"application/x-www-form-urlencoded")]
        body = urllib.parse.urlencode({"csrf": "ẫbc", "token": target.token}).encode()
        answer = send(HOST, target.port, FuzzRequest("t", "POST", "/login", heads, body, other_address=True))
        assert answer.status == 403, answer.body
        assert answer.content_type == "text/html"  # the form again, as documented


class TestProtocolGarbage:
    """Bytes that are not valid HTTP get a 4xx (aiohttp's text/plain refusal), never a 5xx; the node stays up."""

    def test_garbage(self, target: Target) -> None:
        answers: dict[str, str] = {}
        for name, data in GARBAGE.items():
            reply = raw_exchange(target.port, data)
            status_line = reply.split(b"\r\n", 1)[0].decode("latin-1")
            answers[name] = status_line or "(closed)"
            found = re.match(r"HTTP/1\.[01] (\d{3})", status_line)
            assert found, f"{name}: no answer ({reply[:200]!r})"
            assert int(found.group(1)) < 500, f"{name}: {status_line}"
            ready = send(HOST, target.port, FuzzRequest("readyz", "GET", "/readyz"))
            assert ready.status == 200, f"after {name}: {ready.status}"
        print("\n".join(f"{k}: {v}" for k, v in answers.items()))
        check_node_afterwards(target)


WRONG_TYPES: tuple[object, ...] = ([], {}, None, True, 1.5, 2**70, -1, "", "x" * 300, [["deep"]], {"a": {}})


class TestEveryFieldEveryType:
    """Each field of each JSON body the document describes, in turn, given a value of every other JSON type."""

    def test_wrong_types(self, target: Target) -> None:
        doc = openapi_document()
        by_label = {op.label: op for op in operations(doc)}
        sent = 0
        for label, example in EXAMPLES.items():
            op = by_label[label]
            schema = resolve(doc, (op.body or {})["application/json"]["schema"])
            path = op.path.replace("{code}", target.path_values["code"][2])
            heads = [("Authorization", f"Bearer {target.token}".encode()), ("Content-Type", b"application/json")]
            if op.method == "PATCH":
                heads.append(("If-Match", b'"0000"'))  # stale: a valid body gets 412, an invalid one 4xx all the same
            for name in sorted(set(schema.get("properties", {})) | set(example)):
                for value in WRONG_TYPES:
                    body = json.dumps({**example, name: value}).encode()
                    req = FuzzRequest(label, op.method, path, heads, body)
                    check_answer(by_label, op, req, send(HOST, target.port, req))
                    sent += 1
        print(f"{sent} requests with a field of another type")
        assert sent > 300
        check_node_afterwards(target)
