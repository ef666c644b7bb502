"""Processes for ``bench/failover.py``: spawning and stopping them, CPU and memory of the process tree."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
WARDSYNC = ROOT / ".venv" / "bin" / "wardsync"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

_live: set[subprocess.Popen[Any]] = set()


def _child_setup() -> None:
    # PR_SET_PDEATHSIG: a child still running when the bench dies gets SIGTERM.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def spawn(cmd: list[str], *, stdout: Any, stderr: Any, stdin: Any = subprocess.DEVNULL) -> subprocess.Popen[Any]:
    # Its own session: a Ctrl-C at the terminal reaches the bench only, which then stops everything in order.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=stdout,
        stderr=stderr,
        stdin=stdin,
        start_new_session=True,
        preexec_fn=_child_setup,
    )
    _live.add(proc)
    return proc


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    _live.discard(proc)


def stop_all(timeout: float = 5.0) -> None:
    procs = list(_live)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        _live.discard(proc)


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def wait_line(out: Path, proc: subprocess.Popen[Any], marker: str, err: Path, timeout: float = 30.0) -> str:
    """The first line of ``out`` holding ``marker``, once the process printed it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for line in out.read_text().splitlines():
                if marker in line:
                    return line
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args!r} did not start:\n{tail(err)}")


def http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


class StandIn:
    """``wardsync sim national|city`` in its own process, on a loopback port (0: a free one)."""

    def __init__(self, system: str, base: Path, port: int = 0) -> None:
        self.system = system
        self.dir = base / f"{system}-data"
        self.out = base / f"{system}.out"
        self.err = base / f"{system}.err"
        cmd = [str(WARDSYNC), "sim", system, "--listen", f"127.0.0.1:{port}", "--data-dir", str(self.dir)]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = spawn(cmd, stdout=out, stderr=err)
        line = wait_line(self.out, self.proc, "listening on http://", self.err)
        self.url = line.split("listening on ", 1)[1].strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        stop(self.proc)


class Proxy:
    """``wardsync proxy`` (the chaos proxy) in its own process, in front of ``upstream``."""

    def __init__(self, upstream_url: str, base: Path) -> None:
        hostport = upstream_url.split("://", 1)[1].rstrip("/")
        self.out = base / "proxy.out"
        self.err = base / "proxy.err"
        cmd = [str(WARDSYNC), "proxy", "--upstream", hostport]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = spawn(cmd, stdout=out, stderr=err)
        line = wait_line(self.out, self.proc, "chaos proxy listening on", self.err)
        # "chaos proxy listening on http://H:P -> H:P (control http://H:P)"
        self.url = line.split("listening on ", 1)[1].split(" ", 1)[0]
        self.control = line.rsplit("(control ", 1)[1].rstrip(")").strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def set(self, spec: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = http("POST", f"{self.control}/mode", spec)
        return answer

    def clear(self) -> dict[str, Any]:
        answer: dict[str, Any] = http("DELETE", f"{self.control}/mode")
        return answer

    def close(self) -> None:
        stop(self.proc)


# -- measuring -----------------------------------------------------------------------------------------
def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_s() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLK_TCK


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def tree(root: int) -> list[int]:
    """``root`` and every process descending from it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM), 0 if the process is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def pss_kb(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0
