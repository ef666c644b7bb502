"""Intake throughput: durable accepts per second and latency of ``POST /api/v1/dossiers``.

    .venv/bin/python bench/intake.py [--seconds S] [--warmup W] [--clients 32] [--json] [--check]
    .venv/bin/python bench/intake.py --at-rest [--rounds 3]    # the cost of encryption at rest only

Four servers are measured one after another, each started as its own subprocess on a free 127.0.0.1
port with a fresh temporary directory, and each driven by the same load generator (``bench/_load.py``,
a separate process: one aiohttp ClientSession, ``--clients`` concurrent closed-loop tasks posting a
valid intake body varied per request):

* ``trivial``: aiohttp handler that reads the JSON body and answers a small JSON 201 (``bench/_servers.py``);
* ``durable``: one INSERT per request into a fresh SQLite file with the node's pragmas through the node's
  own ``GroupCommit`` (one transaction, one fsync per batch), 201 after the commit (``bench/_servers.py``);
* ``node-clear``: ``wardsync serve`` with a config from ``wardsync init --unit 26743 --agency-code
  000.00.17.H29 --key-file ''``: no keyring, dossier contents stored in clear;
* ``node``: the same, as ``wardsync init`` writes it by default: ``[node] key_file`` names a keyring beside
  the config, so Doc states, records, journal updates and stored answers are sealed with AES-GCM.

The two node runs differ only in the keyring, so their ratio (sealed / clear) for throughput, p99 latency
and server CPU per request is the intake cost of encryption at rest. ``--at-rest`` runs only that pair,
``--rounds N`` repeats it N times, alternating which goes first, and reports the median of the per-round
ratios (the machine's other jobs move both runs of a round alike). After each node run the store is
checked: the sealed run must hold sealed values only, the clear run none.

Besides throughput and latency it reports the server's CPU use over the measurement window (event-loop
thread and other threads, i.e. SQLite worker threads, separately), the load generator's CPU, the average
group-commit batch, and checks that every 201 left a row in the store. Every subprocess and temporary
directory is removed on exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import queue
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
INTAKE_PATH = "/api/v1/dossiers"
UNIT = "26743"
AGENCY = "000.00.17.H29"
SERVERS = ("trivial", "durable", "node-clear", "node")
NODE_KINDS = ("node-clear", "node")
LABELS = {"trivial": "trivial", "durable": "minimal durable", "node-clear": "node, clear", "node": "node, sealed"}
TARGETS = {"node_over_trivial": 0.35, "node_over_durable": 0.6, "node_p99_ms": 50.0}
CLK_TCK = os.sysconf("SC_CLK_TCK")

_live: set[subprocess.Popen[Any]] = set()


# -- processes -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # Linux: a child gets SIGTERM if this process dies without cleaning up (e.g. SIGKILL).
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def spawn(cmd: list[str], *, log: Path, stdout: int | None = None) -> subprocess.Popen[Any]:
    out = open(log, "ab")  # noqa: SIM115  # closed with the process in stop()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=stdout if stdout is not None else out,
        stderr=out,
        start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        text=stdout is not None,
    )
    proc._bench_log = out  # type: ignore[attr-defined]
    _live.add(proc)
    return proc


def stop(proc: subprocess.Popen[Any], *, grace: float = 15.0) -> int | None:
    """SIGTERM, wait, then SIGKILL; always reaps and forgets the process."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        return proc.returncode
    finally:
        _live.discard(proc)
        with contextlib.suppress(Exception):
            proc._bench_log.close()  # type: ignore[attr-defined]
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()


def stop_all() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):
            stop(proc, grace=5.0)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_ready(proc: subprocess.Popen[Any], url: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server not ready at {url} after {timeout:.0f} s:\n{_tail(log)}")


def thread_ticks(pid: int) -> dict[int, int]:
    """utime + stime, in clock ticks, of every thread of ``pid``."""
    ticks: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                ticks[int(tid)] = int(fields[11]) + int(fields[12])
    return ticks


def cpu_split(pid: int, before: dict[int, int], after: dict[int, int], seconds: float) -> dict[str, float]:
    """CPU % over a window: the main (event-loop) thread and all other threads of ``pid``."""
    delta = {tid: after[tid] - before.get(tid, 0) for tid in after}
    loop = delta.get(pid, 0)
    other = sum(v for tid, v in delta.items() if tid != pid)

    def pct(ticks: int) -> float:
        return round(100 * ticks / CLK_TCK / seconds, 1)

    return {"total": pct(loop + other), "loop": pct(loop), "other": pct(other)}


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs together, from /proc/stat."""
    with contextlib.suppress(OSError, ValueError):
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)
    return 0, 0


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


# -- load ----------------------------------------------------------------------------------------------
def run_load(server: subprocess.Popen[Any], url: str, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """Run bench/_load.py against ``url``; sample the server's CPU over the measurement window."""
    cmd = [sys.executable, str(BENCH / "_load.py"), "--url", url, "--clients", str(args.clients),
           "--warmup", str(args.warmup), "--seconds", str(args.seconds), "--timeout", str(args.timeout)]
    if args.idempotency:
        cmd.append("--idempotency")
    if getattr(args, "token", None):
        cmd += ["--token", args.token]
    load = spawn(cmd, log=log, stdout=subprocess.PIPE)
    lines: queue.Queue[str | None] = queue.Queue()

    def reader() -> None:
        assert load.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for line in load.stdout:
                lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + args.warmup + args.seconds + args.timeout + 20
    before: dict[int, int] = {}
    m_before = (0, 0)
    t_start = t_end = 0.0
    cpu: dict[str, float] = {}
    result: dict[str, Any] | None = None
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError("load generator did not finish in time")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                break
            if line == "MARK start":
                before, t_start = thread_ticks(server.pid), time.perf_counter()
                m_before = machine_ticks()
            elif line == "MARK end":
                after, t_end = thread_ticks(server.pid), time.perf_counter()
                m_after = machine_ticks()
                cpu = cpu_split(server.pid, before, after, t_end - t_start)
                busy = m_after[0] - m_before[0]
                cpu["machine"] = round(100 * busy / CLK_TCK / (t_end - t_start), 1)
            elif line.startswith("{"):
                result = json.loads(line)
        load.wait(timeout=10)
    finally:
        stop(load, grace=3.0)
    if result is None:
        raise RuntimeError(f"load generator gave no result (exit {load.returncode}):\n{_tail(log)}")
    result["server_cpu_pct"] = cpu
    if cpu and result["requests"]:
        # Server CPU per accepted request: far less sensitive to other jobs on the machine than accepts/s.
        result["cpu_ms_per_req"] = round(10 * cpu["total"] * result["seconds"] / result["requests"], 3)
    if "machine" in cpu:
        # CPU the machine spent on anything but this server and the load generator (other jobs).
        cpu["others"] = round(max(0.0, cpu["machine"] - cpu["total"] - result["loadgen_cpu_pct"]), 1)
    return result


# -- the servers -------------------------------------------------------------------------------------------
def wardsync_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "wardsync"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "node"]


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2.0) as resp:
        return json.loads(resp.read())


def bench_server(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"wardsync-bench-{kind}-", dir=args.tmp_dir) as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data"
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = tmp / "server.log"
        if kind in NODE_KINDS:
            # The keyring goes beside the config (outside data_dir), as `wardsync init` places it; '' is none.
            key_file = str(tmp / "wardsync.key") if kind == "node" else ""
            init = subprocess.run(
                [*wardsync_cmd(), "init", "--unit", UNIT, "--agency-code", AGENCY, "--out", str(tmp / "wardsync.toml"),
                 "--listen", f"127.0.0.1:{port}", "--data-dir", str(data), "--key-file", key_file],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
            )
            if init.returncode != 0:
                raise RuntimeError(f"wardsync init failed: {init.stderr.strip()}")
            if kind == "node" and not Path(key_file).is_file():
                raise RuntimeError(f"wardsync init wrote no keyring at {key_file}")
            token = subprocess.run(
                [*wardsync_cmd(), "token", "create", "--config", str(tmp / "wardsync.toml"), "--role", "clerk"],
                cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
            ).stdout.strip()
            args = argparse.Namespace(**{**vars(args), "token": token})
            cmd = [*wardsync_cmd(), "serve", "--config", str(tmp / "wardsync.toml")]
            health = f"{base}/readyz"
        else:
            cmd = [sys.executable, str(BENCH / "_servers.py"), kind, "--port", str(port), "--data-dir", str(data)]
            health = f"{base}/livez"
        server = spawn(cmd, log=log)
        try:
            wait_ready(server, health, log)
            result = run_load(server, base + INTAKE_PATH, args, tmp / "load.log")
            if kind == "durable":
                with contextlib.suppress(Exception):
                    stats = _get_json(f"{base}/stats")
                    result["avg_batch"] = round(stats["items"] / max(1, stats["batches"]), 1)
        finally:
            code = stop(server)
        result["server_exit"] = code
        if code not in (0, None):
            result["server_log_tail"] = _tail(log)
        # Every 201 must have left a row behind once the server stopped.
        if kind in ("durable", *NODE_KINDS):
            db = data / ("durable.sqlite3" if kind == "durable" else "wardsync.sqlite3")
            conn = sqlite3.connect(db)
            try:
                if kind == "durable":
                    rows = conn.execute("SELECT count(*) FROM intake").fetchone()[0]
                else:
                    rows = conn.execute("SELECT count(*) FROM dossiers").fetchone()[0]
                    # One clock reading per batch: distinct journal timestamps approximate the batch count.
                    batches = conn.execute("SELECT count(DISTINCT at) FROM journal").fetchone()[0]
                    result["avg_batch"] = round(rows / max(1, batches), 1)
                    result["at_rest"] = at_rest_check(kind, conn)
            finally:
                conn.close()
            result["rows"] = rows
            result["durable_ok"] = rows >= result["accepted_total"]
        return result


def at_rest_check(kind: str, conn: sqlite3.Connection) -> dict[str, Any]:
    """How many stored dossier contents are sealed and how many clear; ok when they match the run's kind."""
    from node.crypto import count_key_usage  # the node's own count, as `wardsync key status` shows it

    sealed = clear = 0
    for counts in count_key_usage(conn).values():
        for key_id, n in counts.items():
            if key_id:
                sealed += n
            else:
                clear += n
    ok = (sealed > 0 and clear == 0) if kind == "node" else (sealed == 0 and clear > 0)
    return {"sealed_values": sealed, "clear_values": clear, "ok": ok}


# -- report --------------------------------------------------------------------------------------------
AT_REST_METRICS = ("accepts_per_s", "p99_ms", "cpu_ms_per_req")


def at_rest_round(clear: dict[str, Any], sealed: dict[str, Any]) -> dict[str, Any]:
    """One round's sealed / clear ratios (throughput below 1 and p99 or CPU above 1 mean a cost)."""
    ratio: dict[str, float | None] = {}
    for metric in AT_REST_METRICS:
        a, b = sealed.get(metric), clear.get(metric)
        ratio[metric] = round(float(a) / float(b), 3) if a is not None and b else None
    return {
        "clear": {m: clear.get(m) for m in AT_REST_METRICS},
        "sealed": {m: sealed.get(m) for m in AT_REST_METRICS},
        "sealed_over_clear": ratio,
        "store_ok": bool(clear.get("at_rest", {}).get("ok")) and bool(sealed.get("at_rest", {}).get("ok")),
    }


def at_rest_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    median: dict[str, float | None] = {}
    for metric in AT_REST_METRICS:
        values = [r["sealed_over_clear"][metric] for r in rounds if r["sealed_over_clear"][metric] is not None]
        median[metric] = round(statistics.median(values), 3) if values else None
    return {"rounds": rounds, "median_sealed_over_clear": median, "store_ok": all(r["store_ok"] for r in rounds)}


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    node, trivial, durable = results.get("node"), results.get("trivial"), results.get("durable")

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
        if not a or not b or not b["accepts_per_s"]:
            return None
        return round(float(a["accepts_per_s"]) / float(b["accepts_per_s"]), 3)

    r_trivial, r_durable = ratio(node, trivial), ratio(node, durable)
    p99 = node["p99_ms"] if node else None
    targets = {
        "node_over_trivial": {"value": r_trivial, "target": f">= {TARGETS['node_over_trivial']}",
                              "met": r_trivial is not None and r_trivial >= TARGETS["node_over_trivial"]},
        "node_over_durable": {"value": r_durable, "target": f">= {TARGETS['node_over_durable']}",
                              "met": r_durable is not None and r_durable >= TARGETS["node_over_durable"]},
        "node_p99_ms": {"value": p99, "target": f"<= {TARGETS['node_p99_ms']:g}",
                        "met": p99 is not None and p99 <= TARGETS["node_p99_ms"]},
    }
    return {"ratios": {"node/trivial": r_trivial, "node/minimal_durable": r_durable}, "targets": targets}


def _fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def print_table(report: dict[str, Any]) -> None:
    cfg = report["config"]
    print(f"intake benchmark: {cfg['clients']} clients, {cfg['warmup_s']:g} s warm-up + {cfg['seconds']:g} s measured "
          f"per server, {cfg['cpus']} CPUs, load average {cfg['loadavg']}, temp dir on {cfg['tmp_fs']}"
          + (", Idempotency-Key on every request" if cfg["idempotency"] else ""))
    print()
    head = (f"{'server':<16} {'requests':>8} {'accepts/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
            f"{'srv CPU% loop+thr':>18} {'CPU ms/req':>10} {'gen CPU%':>9} {'others%':>8} {'avg batch':>9} "
            f"{'non-201':>8}")
    print(head)
    print("-" * len(head))
    for kind, r in report["servers"].items():
        cpu = r.get("server_cpu_pct") or {}
        cpu_s = f"{_fmt(cpu.get('loop'), '.0f')}+{_fmt(cpu.get('other'), '.0f')}" if cpu else "-"
        bad = sum(v for k, v in r["statuses"].items() if k != "201") + sum(r["errors"].values())
        print(f"{LABELS[kind]:<16} {r['requests']:>8} {r['accepts_per_s']:>10.1f} {_fmt(r['p50_ms'], '.2f'):>8} "
              f"{_fmt(r['p99_ms'], '.2f'):>8} {_fmt(r['max_ms'], '.1f'):>8} {cpu_s:>18} "
              f"{_fmt(r.get('cpu_ms_per_req'), '.3f'):>10} "
              f"{r['loadgen_cpu_pct']:>9.0f} {_fmt(cpu.get('others'), '.0f'):>8} "
              f"{_fmt(r.get('avg_batch')):>9} {bad:>8}")
    print(f"(CPU % of one core over the measured window; {cfg['cpus']} cores = {100 * (cfg['cpus'] or 1)}%; "
          "loop = server's event-loop thread, thr = its other threads (SQLite workers), others = other jobs;\n"
          " CPU ms/req = server CPU time per accepted request)")
    print()
    names = {"node_over_trivial": "node / trivial", "node_over_durable": "node / minimal durable",
             "node_p99_ms": "node p99 ms"}
    for key, t in report["targets"].items():
        val = _fmt(t["value"], ".3f" if key != "node_p99_ms" else ".2f")
        verdict = "n/a (not measured)" if t["value"] is None else ("MET" if t["met"] else "NOT MET")
        print(f"{names[key]:<24} {val:>8}   target {t['target']:<7}  {verdict}")
    if "at_rest" in report:
        print()
        print_at_rest(report["at_rest"])
    for kind, r in report["servers"].items():
        if "rows" in r:
            ok = "ok" if r["durable_ok"] else "MISSING ROWS"
            print(f"{LABELS[kind]}: {r['accepted_total']} 201s over the whole run, "
                  f"{r['rows']} rows in the store ({ok})")
        if "at_rest" in r:
            a = r["at_rest"]
            print(f"{LABELS[kind]}: {a['sealed_values']} sealed and {a['clear_values']} clear stored values "
                  f"({'ok' if a['ok'] else 'NOT AS CONFIGURED'})")
        if r.get("errors") or any(k != "201" for k in r["statuses"]):
            print(f"{LABELS[kind]}: statuses {r['statuses']} errors {r['errors']}")
        if r.get("server_log_tail"):
            print(f"{LABELS[kind]} exited with {r['server_exit']}:\n{r['server_log_tail']}")


def print_at_rest(at_rest: dict[str, Any]) -> None:
    rounds = at_rest["rounds"]
    print("encryption at rest, node sealed / node clear (throughput < 1, p99 and CPU > 1 are its cost):")
    for i, r in enumerate(rounds, 1):
        c, s, q = r["clear"], r["sealed"], r["sealed_over_clear"]
        print(f"  round {i}: accepts/s {_fmt(s['accepts_per_s'], '.1f')} / {_fmt(c['accepts_per_s'], '.1f')} = "
              f"{_fmt(q['accepts_per_s'], '.3f')}   p99 ms {_fmt(s['p99_ms'], '.2f')} / {_fmt(c['p99_ms'], '.2f')} = "
              f"{_fmt(q['p99_ms'], '.3f')}   CPU ms/req {_fmt(s['cpu_ms_per_req'], '.3f')} / "
              f"{_fmt(c['cpu_ms_per_req'], '.3f')} = {_fmt(q['cpu_ms_per_req'], '.3f')}")
    m = at_rest["median_sealed_over_clear"]
    label = "median of rounds" if len(rounds) > 1 else "ratio"
    print(f"  {label}: throughput {_fmt(m['accepts_per_s'], '.3f')}, p99 {_fmt(m['p99_ms'], '.3f')}, "
          f"CPU per request {_fmt(m['cpu_ms_per_req'], '.3f')}"
          + ("" if at_rest["store_ok"] else "   (a store did not hold what its run was configured for)"))
    print()


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        stop_all()
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per server (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per server (default 3)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout in seconds (default 5)")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="comma-separated subset of trivial,durable,node-clear,node")
    parser.add_argument("--at-rest", action="store_true",
                        help="measure only the cost of encryption at rest: node-clear and node (sealed)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the node-clear/node pair this many times, alternating the order (default 1)")
    parser.add_argument("--idempotency", action="store_true", help="send a fresh Idempotency-Key with every request")
    parser.add_argument("--tmp-dir", help="where the temporary data directories go (default: system temp dir)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a target is not met or a node's store is not sealed as configured")
    args = parser.parse_args(argv)
    kinds = list(NODE_KINDS) if args.at_rest else [k.strip() for k in args.servers.split(",") if k.strip()]
    if unknown := set(kinds) - set(SERVERS):
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    pair = all(k in kinds for k in NODE_KINDS)
    if args.rounds > 1 and not pair:
        parser.error("--rounds repeats the node-clear/node pair: select both (or use --at-rest)")

    tmp_root = Path(args.tmp_dir or tempfile.gettempdir()).resolve()
    report: dict[str, Any] = {
        "config": {"clients": args.clients, "warmup_s": args.warmup, "seconds": args.seconds,
                   "idempotency": args.idempotency, "cpus": os.cpu_count(),
                   "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                   "tmp_fs": f"{tmp_root} ({fs_type(tmp_root)})", "python": sys.version.split()[0]},
        "servers": {},
    }
    rounds: list[dict[str, Any]] = []
    with cleanup_on_signals():
        for kind in kinds:
            if not args.json:
                print(f"running {LABELS[kind]} ...", file=sys.stderr, flush=True)
            report["servers"][kind] = bench_server(kind, args)
        if pair:
            rounds.append(at_rest_round(report["servers"]["node-clear"], report["servers"]["node"]))
        for i in range(1, args.rounds):
            order = NODE_KINDS[::-1] if i % 2 else NODE_KINDS  # alternate which of the pair goes first
            got: dict[str, dict[str, Any]] = {}
            for kind in order:
                if not args.json:
                    print(f"round {i + 1}: running {LABELS[kind]} ...", file=sys.stderr, flush=True)
                got[kind] = bench_server(kind, args)
            rounds.append(at_rest_round(got["node-clear"], got["node"]))
    report["config"]["rounds"] = args.rounds
    report.update(summarise(report["servers"]))
    if rounds:
        report["at_rest"] = at_rest_summary(rounds)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_table(report)
    if args.check and not all(t["met"] for t in report["targets"].values() if t["value"] is not None):
        return 1
    if args.check and not report.get("at_rest", {}).get("store_ok", True):
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
