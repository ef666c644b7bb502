"""Failover drills through the CLI: real stand-ins, real nodes in worker processes, the checker and the report.

The default run has two short drills (a dozen nodes, a working day compressed into 15 s): a national
outage, and a power cut (SIGKILL of a worker) compared with the first as its baseline; plus a drill that
must fail its invariants, and the checker on planted faults. The full 168-node drills over every scenario
are behind ``-m slow``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from simulations.checker import Snapshot, check
from simulations.drill import ScenarioError, list_scenarios, parse_scenario, scaled_settings
from simulations.fleet import node_config

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--nodes", "12", "--minutes", "0.25", "--dossiers", "150", "--drain-s", "40"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("WARDSYNC_")}


class DrillRun:
    """One ``python -m node drill ...`` process; stderr read as it comes, the fleet dashboard polled once up."""

    def __init__(self, args: list[str], timeout: float = 100.0) -> None:
        self.cmd = [sys.executable, "-m", "node", "drill", *args]
        self.stderr: list[str] = []
        self.fleet: dict[str, Any] | None = None
        proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        # Each pipe has one reader (communicate() would read stderr too, taking lines from under ours).
        reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        reader.start()
        out: list[str] = []
        stdout = threading.Thread(target=lambda: out.append(proc.stdout.read() if proc.stdout else ""), daemon=True)
        stdout.start()
        try:
            proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stdout.join(10)
        reader.join(20)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        self.stdout = "".join(out)
        self.returncode = proc.returncode

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.stderr.append(line)
            if line.startswith("fleet dashboard: http") and self.fleet is None:
                try:
                    self.fleet = self._poll_dashboard(line.split(": ", 1)[1].strip())
                except (OSError, ValueError) as exc:  # keep reading stderr, or the drill blocks on a full pipe
                    self.fleet = {"error": repr(exc), "units": []}

    @staticmethod
    def _poll_dashboard(url: str) -> dict[str, Any]:
        """The dashboard's view once every unit was polled with the token the drill made for it."""
        body: dict[str, Any] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with urllib.request.urlopen(url + "api/fleet", timeout=5) as r:
                body = json.loads(r.read())
            if body["units"] and all(u["state"] != "unknown" for u in body["units"]):
                break
            time.sleep(0.3)
        return body

    def figures(self) -> dict[str, Any]:
        assert self.stdout.strip(), "".join(self.stderr)[-3000:]
        out: dict[str, Any] = json.loads(self.stdout)
        return out


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> tuple[DrillRun, Path]:
    report = tmp_path_factory.mktemp("drill") / "outage-report"
    run = DrillRun(["--scenario", "national-outage", *SHORT, "--seed", "7", "--report", str(report), "--json"])
    return run, report


class TestShortDrill:
    """A dozen nodes through a national outage: every invariant checked through the command."""

    def test_every_invariant_holds(self, outage: tuple[DrillRun, Path]) -> None:
        """Exit 0; nothing lost, duplicated or unexpected; replicas converged; every unit switched."""
        run, _ = outage
        assert run.returncode == 0, "".join(run.stderr)[-3000:]
        f = run.figures()
        assert (f["lost"], f["duplicated"], f["unexpected"], f["converged"]) == (0, 0, 0, True)
        assert f["ok"] is True and all(f["invariants"].values())
        assert (f["scenario"], f["seed"], f["nodes"]) == ("national-outage", 7, 12)
        # The whole day was acknowledged and is on both upstreams: the invariants were not held vacuously.
        assert f["acknowledged"] == 150 and f["acknowledged_steps"] > 150
        assert f["replicas"]["national"] == f["replicas"]["city"] == 150
        (phase,) = f["failover"]["phases"]
        assert phase["units"] == phase["detected"] == phase["switched"] == 12
        assert phase["failed_back"] == 12

    def test_fleet_dashboard_served_with_the_drills_tokens(self, outage: tuple[DrillRun, Path]) -> None:
        """The dashboard's URL is printed and it sees every node, polled with a token the drill made."""
        run, _ = outage
        assert run.fleet is not None, "".join(run.stderr)[-3000:]
        units = run.fleet["units"]
        assert len(units) == 12, run.fleet
        states = [u["state"] for u in units]
        # Every node answered the dashboard's poll with the drill's token (a node too busy to answer within
        # the poll's timeout shows as unreachable on a loaded machine; a refused token never may).
        assert "unauthorized" not in states and "unknown" not in states, run.fleet
        assert sum(s in ("healthy", "degraded", "failover", "offline") for s in states) >= 6, run.fleet
        assert any("Authorization: Bearer wst_" in line for line in run.stderr), run.stderr[:6]

    def test_report(self, outage: tuple[DrillRun, Path]) -> None:
        """HTML, Markdown, JSON and three plots; the HTML names the scenario, the seed and the version."""
        _, report = outage
        for name in ("report.html", "report.md", "report.json", "lag.png", "timeline.png", "backlog.png"):
            assert (report / name).stat().st_size > 0, name
        for name in ("lag.png", "timeline.png", "backlog.png"):
            assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        page = (report / "report.html").read_text(encoding="utf-8")
        assert "Failover drill: national-outage" in page
        assert "<td class=''>seed</td><td class=''>7</td>" in page
        assert "software version" in page and "PASSED" in page
        data = json.loads((report / "report.json").read_text(encoding="utf-8"))
        assert data["checker"]["lost"] == 0 and data["seed"] == 7


class TestCrashDrill:
    """A power cut in a server room: a worker and its nodes SIGKILLed mid-day and restarted on their data."""

    def test_node_crash_against_a_baseline(self, outage: tuple[DrillRun, Path], tmp_path: Path) -> None:
        """Nothing acknowledged is lost across the SIGKILL; the report compares with the earlier run."""
        _, baseline = outage
        report = tmp_path / "crash-report"
        run = DrillRun(
            [
                "--scenario",
                "node-crash",
                *SHORT,
                "--report",
                str(report),
                "--baseline",
                str(baseline),
                "--json",
                "--dashboard",
                "off",
            ]
        )
        assert run.returncode == 0, "".join(run.stderr)[-3000:]
        f = run.figures()
        assert (f["lost"], f["duplicated"], f["unexpected"], f["converged"]) == (0, 0, 0, True)
        assert f["acknowledged"] >= 140
        data = json.loads((report / "report.json").read_text(encoding="utf-8"))
        kinds = [p["kind"] for p in data["phases"]]
        assert kinds == ["kill", "restart"], data["phases"]
        killed = data["phases"][0]["units"]
        assert len(killed) == 6  # worker 0's share of 12 nodes on 2 workers
        md = (report / "report.md").read_text(encoding="utf-8")
        page = (report / "report.html").read_text(encoding="utf-8")
        assert "## Against the baseline" in md and "<h2>Against the baseline</h2>" in page
        assert "| lost | 0 | 0 |" in md


class TestViolations:
    """The drill fails loudly when an invariant does not hold."""

    @pytest.mark.slow  # a whole compressed day with a fleet; the checker's verdicts are covered by TestChecker
    def test_exit_status_when_the_backlog_never_reaches_the_upstreams(self, tmp_path: Path) -> None:
        """The city system down to the end of the day and no time to drain: lost dossiers, exit status 1."""
        scenario = tmp_path / "cut-off.toml"
        scenario.write_text(
            'name = "cut-off"\ndescription = "The city system down from the first hour to the end."\n'
            '[[phase]]\nat = "1h"\naction = "fault"\ntarget = "city"\nmode = "down"\n',
            encoding="utf-8",
        )
        run = DrillRun(
            [
                "--scenario",
                str(scenario),
                "--nodes",
                "3",
                "--workers",
                "1",
                "--minutes",
                "0.1",
                "--dossiers",
                "40",
                "--drain-s",
                "0",
                "--json",
                "--dashboard",
                "off",
            ]
        )
        assert run.returncode == 1, "".join(run.stderr)[-3000:]
        f = run.figures()
        assert f["ok"] is False and f["invariants"]["lost"] is False
        assert f["lost_dossiers"] > 0
        assert all(x["missing_from"] == ["city"] for x in f["examples"]["lost"] if "missing_from" in x)
        assert "VIOLATED" in "".join(run.stderr)

    def test_bad_scenario_exits_2_listing_every_problem(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.toml"
        bad.write_text('name = "Bad Name"\n[[phase]]\nat = "99h"\naction = "explode"\n', encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "node", "drill", "--scenario", str(bad)],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2
        assert "name: required" in done.stderr and "action: 'explode'" in done.stderr
        done = subprocess.run(
            [sys.executable, "-m", "node", "drill", "--scenario", "no-such-thing"],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2 and "known: both-down" in done.stderr


class TestScenarios:
    """The scenario files the DX Centre edits."""

    def test_list(self) -> None:
        """`wardsync drill list --json` lists every scenario file with its description, none invalid."""
        done = subprocess.run(
            [sys.executable, "-m", "node", "drill", "list", "--json"],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        listed = {s["name"]: s["description"] for s in json.loads(done.stdout)}
        wanted = {
            "national-outage",
            "city-outage",
            "both-down",
            "flapping-primary",
            "slow-primary",
            "partition",
            "node-crash",
            "clock-skew",
            "session-expiry-storm",
            "throttling",
        }
        assert wanted <= set(listed)
        assert not [n for n, d in listed.items() if d.startswith("INVALID") or not d]

    def test_parse_errors(self) -> None:
        with pytest.raises(ScenarioError) as err:
            parse_scenario(
                'name = "x"\n[[phase]]\nat = "1h"\naction = "fault"\ntarget = "moon"\nmode = "down"\n'
                'units = "25%"\nvia = "standin"\n'
            )
        assert any("target: 'moon'" in p for p in err.value.problems)
        assert any('use via = "node" for a subset' in p for p in err.value.problems)
        assert len(list_scenarios()) >= 10


def _snapshot() -> Snapshot:
    """Two dossiers acknowledged, each on both upstreams and on its unit's node, with equal digests."""
    return Snapshot(
        attempted={"0": {"unit": "25747", "competent": "25747"}, "1": {"unit": "25750", "competent": "25750"}},
        acked={"0": "C0", "1": "C1"},
        acked_steps={"0": [[4, "step a [drill:0.2]"]], "1": []},
        nodes={
            "25747": {"C0": {"digest": "d0", "tag": "drill:0", "notes": ["x", "step a [drill:0.2]"]}},
            "25750": {"C1": {"digest": "d1", "tag": "drill:1", "notes": []}},
        },
        upstreams={"national": {"C0": "d0", "C1": "d1"}, "city": {"C0": "d0", "C1": "d1"}},
        upstream_duplicates={"national": 0, "city": 0},
    )


class TestFleetNodeSettings:
    """A big fleet's nodes get a smaller SQLite page cache; a node's own unit and store always win."""

    def test_page_cache_by_fleet_size(self) -> None:
        assert scaled_settings(120.0, 168)["node"] == {"sqlite_cache_kib": 512}
        assert scaled_settings(120.0, 12)["node"] == {"sqlite_cache_kib": 2000}

    def test_worker_spec_reaches_the_node_config(self, tmp_path: Path) -> None:
        spec = {
            "national_url": "http://127.0.0.1:9",
            "city_url": "http://127.0.0.1:9",
            "node": {"sqlite_cache_kib": 512, "unit": "00000", "data_dir": "/elsewhere"},
        }
        n = {"unit": "26743", "agency": "000.20.00.H29", "data_dir": str(tmp_path / "26743")}
        config = node_config(spec, n)
        assert config.node.sqlite_cache_kib == 512
        assert (config.node.unit, config.node.data_dir) == ("26743", str(tmp_path / "26743"))


class TestChecker:
    """The checker on planted faults: each kind of violation is counted."""

    def test_clean(self) -> None:
        r = check(_snapshot())
        assert (r["lost"], r["duplicated"], r["unexpected"], r["converged"], r["ok"]) == (0, 0, 0, True, True)

    def test_each_violation(self) -> None:
        s = _snapshot()
        lost = copy.deepcopy(s)
        del lost.upstreams["city"]["C1"]
        assert check(lost)["lost"] == 1 and not check(lost)["ok"]
        step = copy.deepcopy(s)
        step.nodes["25747"]["C0"]["notes"] = ["x"]
        assert check(step)["lost_steps"] == 1
        dup = copy.deepcopy(s)
        dup.nodes["25747"]["C9"] = {"digest": "d9", "tag": "drill:0", "notes": []}
        dup.upstreams["national"]["C9"] = dup.upstreams["city"]["C9"] = "d9"
        assert check(dup)["duplicated"] == 1
        twice = copy.deepcopy(s)
        twice.nodes["25747"]["C0"]["notes"] = ["step a [drill:0.2]", "step a [drill:0.2]"]
        assert check(twice)["duplicated"] == 1
        stranger = copy.deepcopy(s)
        stranger.upstreams["national"]["ZZ"] = "dz"
        assert check(stranger)["unexpected"] == 1
        stray = copy.deepcopy(s)
        stray.attempted["2"] = {"unit": "25747", "competent": "25747", "code": "C2"}
        stray.upstreams["national"]["C2"] = "d2"  # sent to the portal, never acknowledged, never pulled
        r = check(stray)
        assert (r["unexpected"], r["in_doubt"], r["converged"], r["ok"]) == (0, 1, True, True)
        diverged = copy.deepcopy(s)
        diverged.upstreams["city"]["C0"] = "other"
        r = check(diverged)
        assert r["converged"] is False and r["diverged"] == 1 and not r["ok"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("scenario", sorted(n for n, _ in list_scenarios()))
def test_full_fleet_drill(scenario: str, tmp_path: Path) -> None:
    """All 168 units through each scenario's day and faults: every invariant holds, the fleet drains.

    4,000 dossiers with their steps (about 17,000 desk actions) over the scenario's compressed day: enough
    for every unit to hold work when the faults strike, and still playable on a 2-core machine; the peak
    day's full volume is the drill benchmark's (bench/drill.py).
    """
    run = DrillRun(
        [
            "--scenario",
            scenario,
            "--dossiers",
            "4000",
            "--drain-s",
            "300",
            "--report",
            str(tmp_path / "report"),
            "--json",
            "--dashboard",
            "off",
        ],
        timeout=1700,
    )
    assert run.returncode == 0, "".join(run.stderr)[-3000:]
    f = run.figures()
    assert (f["lost"], f["duplicated"], f["unexpected"], f["converged"]) == (0, 0, 0, True)
    assert f["nodes"] == 168 and f["acknowledged"] >= 3900
    assert f["timings"]["drain_s"] >= 0, "the fleet did not drain and return to its primary in time"
