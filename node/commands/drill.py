"""``wardsync drill``: a failover drill of a simulated fleet (or a live one), checked and reported.

    wardsync drill --scenario national-outage [--nodes N] [--seed S] [--report DIR] [--json] [--baseline REPORT]
    wardsync drill list                        # the scenarios, with what each one does (also --list)
    wardsync drill --fleet FILE --scenario S   # drive the live nodes of an inventory (fault windows only)
    wardsync drill abort --fleet FILE          # end every fault window and forced choice at once

A simulated drill starts the national portal and city system stand-ins and ``--nodes`` real nodes (the
first units of the registry) in a few worker processes, each node with its own store and a token of its
own; plays a seeded working day of dossiers against them, compressed into ``--minutes`` real minutes,
while the scenario's faults happen; lets the backlog drain; then checks that every acknowledged dossier
and step is everywhere it must be, once, with equal digests. The fleet dashboard watches the nodes while
the drill runs (``--dashboard``).

Exit status: 0 when every invariant holds, 1 when one is violated (lost, duplicated, unexpected not 0, not
converged, or a unit that did not switch where the scenario expects it), 2 for a bad scenario, inventory
or option, 3 when the fleet could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

EXIT_VIOLATED = 1
EXIT_CONFIG = 2
EXIT_FAILED = 3
ACTIONS = ("run", "list", "abort")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "drill",
        help="run a failover drill on a simulated fleet (or a live one) and check that nothing was lost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=ACTIONS,
        default="run",
        help="run (default), list the scenarios, or abort a live drill (with --fleet)",
    )
    p.add_argument("--scenario", help="a scenario name (see `wardsync drill list`) or a path to a TOML file")
    p.add_argument("--list", action="store_true", help="list the scenarios with their descriptions")
    p.add_argument("--nodes", type=int, default=168, help="units in the simulated fleet (default all 168)")
    p.add_argument("--seed", type=int, default=1, help="seed of the workload and of unit choices (default 1)")
    p.add_argument(
        "--report", type=Path, default=None, help="directory for the report (HTML, Markdown, PNG plots and report.json)"
    )
    p.add_argument(
        "--baseline", type=Path, default=None, help="an earlier report.json (or its directory) to compare this run with"
    )
    p.add_argument("--json", action="store_true", help="print the checker's figures as JSON on stdout")
    p.add_argument(
        "--minutes", type=float, default=None, help="real minutes for the simulated day (default: the scenario's)"
    )
    p.add_argument(
        "--dossiers",
        type=int,
        default=None,
        help="dossiers in the day (default: the scenario's daily volume, the fleet's share of it)",
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes sharing the nodes (default 2)")
    p.add_argument(
        "--drain-s",
        type=float,
        default=120.0,
        help="real seconds allowed for the backlog to drain after the day (default 120)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the nodes' and stand-ins' data go (default: a temporary directory, removed)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    p.add_argument(
        "--dashboard",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="serve the fleet dashboard there during the drill (default 127.0.0.1:0, a free port); 'off' for none",
    )
    p.add_argument(
        "--fleet",
        type=Path,
        default=None,
        help="fleet inventory: drive those live nodes through their drill-control APIs instead",
    )
    p.set_defaults(func=_cmd_drill)


def _cmd_drill(args: argparse.Namespace) -> int:
    if args.list or args.action == "list":
        return _cmd_list(args)
    if args.action == "abort":
        if args.fleet is None:
            print("wardsync drill abort: --fleet FILE is required", file=sys.stderr)
            return EXIT_CONFIG
        live = _live()
        if live is None:
            return EXIT_CONFIG
        return int(live.abort(args.fleet))
    if not args.scenario:
        print("wardsync drill: --scenario NAME is required (`wardsync drill list` shows them)", file=sys.stderr)
        return EXIT_CONFIG
    problems = []
    if args.nodes < 1 or args.nodes > 168:
        problems.append("--nodes: must be 1 to 168")
    if args.minutes is not None and args.minutes <= 0:
        problems.append("--minutes: must be positive")
    if args.dossiers is not None and args.dossiers < 1:
        problems.append("--dossiers: must be positive")
    if args.workers < 1:
        problems.append("--workers: must be at least 1")
    if problems:
        print("wardsync drill: " + "; ".join(problems), file=sys.stderr)
        return EXIT_CONFIG

    from simulations.drill import ScenarioError, load_scenario

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"wardsync drill: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    baseline = None
    if args.baseline is not None:
        try:
            baseline = load_baseline(args.baseline)
        except ValueError as exc:
            print(f"wardsync drill: --baseline: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    err = Console(stderr=True)
    result = _run_live(args, scenario, err) if args.fleet is not None else _run_simulated(args, scenario, err)
    if isinstance(result, int):
        return result
    return finish(result, args, baseline, err)


def _cmd_list(args: argparse.Namespace) -> int:
    from simulations.drill import SCENARIOS, list_scenarios

    found = list_scenarios()
    if args.json:
        print(json.dumps([{"name": n, "description": d} for n, d in found], ensure_ascii=False, indent=1))
        return 0
    table = Table(title=f"scenarios ({SCENARIOS})", title_justify="left")
    table.add_column("scenario", no_wrap=True)
    table.add_column("what happens")
    for name, description in found:
        table.add_row(name, description)
    Console().print(table)
    return 0


def load_baseline(path: Path) -> dict[str, Any]:
    """An earlier run's figures: ``report.json``, or a report directory holding one."""
    file = path / "report.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {file}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{file} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("checker"), dict):
        raise ValueError(f"{file} is not a drill report (no checker figures)")
    return data


def _live() -> Any:
    """The live-fleet module, imported only when a live drill is asked for."""
    try:
        return importlib.import_module("simulations.live")
    except ImportError as exc:
        print(f"wardsync drill: live drills are not available here ({exc})", file=sys.stderr)
        return None


# -- running -------------------------------------------------------------------------------------------
def _run_until_signal(main: Any) -> Any:
    """Run ``main()``; SIGINT or SIGTERM cancels it, so the drill stops its processes before exiting."""

    async def runner() -> Any:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        return await main()

    try:
        return asyncio.run(runner())
    except asyncio.CancelledError:
        print("wardsync drill: interrupted; every process of the drill was stopped", file=sys.stderr)
        return 130


def _say(message: str) -> None:
    """A line on stderr above the progress bar. Plain print: the bar's live display redirects stderr on a
    terminal, and a console print racing its refresh elsewhere can lose the line."""
    print(message, file=sys.stderr, flush=True)


class FleetBar:
    """The progress bar (on stderr) and, once the nodes are up, the fleet dashboard and a command to try."""

    def __init__(self, console: Console, listen: str, quiet: bool) -> None:
        self.console = console
        self.listen = listen
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]{task.fields[phase]:<22.22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[fleet]}"),
            console=console,
            transient=False,
            disable=quiet,
        )
        self.task = self.progress.add_task("drill", total=None, phase="starting the fleet", fleet="")
        self.runner: Any = None
        self.monitor: Any = None
        self.dashboard_url: str | None = None
        self._starting = False
        self._serve_task: asyncio.Task[None] | None = None
        self.announced = False

    def __enter__(self) -> FleetBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, d: Any) -> None:
        states = list(d.active.values())
        backlog = sum(int(v[0]) for per in d.latest_lag.values() for v in per.values())
        fleet = (
            f"national {states.count('national')} · city {states.count('city')} · "
            f"none {states.count(None)} · backlog {backlog}"
        )
        done, total = (d.driver.done, d.driver.total) if d.driver is not None else (0, None)
        self.progress.update(self.task, completed=done, total=total, phase=d.now_phase, fleet=fleet)
        if not self.announced and d.targets:
            self.announced = True
            self._announce(d)
        if self.listen != "off" and not self._starting:
            self._starting = True
            # Kept: the loop holds tasks only weakly. Started from the progress callback, once the nodes are up.
            self._serve_task = asyncio.get_running_loop().create_task(self._serve(d))
        if self.monitor is not None:
            self._sync(d)

    def _announce(self, d: Any) -> None:
        unit, target = next(iter(sorted((u, t) for u, t in d.targets.items() if t is not None)), (None, None))
        if target is None or self.quiet:
            return
        _say(
            f"{len(d.targets)} nodes up, each with its own token (roles clerk, operator, drill). Try one:\n"
            f"  curl -s -H 'Authorization: Bearer {target.token}' {target.url}/api/v1/status   # unit {unit}"
        )

    def _inventory(self, d: Any) -> list[Any]:
        from node.fleet import FleetNode
        from node.registry import get_unit

        out = []
        for code, t in sorted(d.targets.items()):
            unit = get_unit(code)
            if t is not None and t.token:
                out.append(FleetNode(code, unit.name if unit else code, t.url, t.token))
        return out

    async def _serve(self, d: Any) -> None:
        from aiohttp import web

        from node.config import split_listen
        from node.fleet import MONITOR, build_fleet_app

        try:
            host, port = split_listen(self.listen)
            app = build_fleet_app(self._inventory(d), poll_s=2.0, timeout_s=2.0)
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await runner.setup()
            self.runner = runner
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except (OSError, ValueError) as exc:
            _say(f"the fleet dashboard could not start: {exc}")
            return
        self.monitor = app[MONITOR]
        addr = runner.addresses[0]
        self.dashboard_url = f"http://{addr[0]}:{addr[1]}/"
        if not self.quiet:
            _say(f"fleet dashboard: {self.dashboard_url}")

    def _sync(self, d: Any) -> None:
        """A restarted worker serves its nodes on new ports: point the dashboard at them."""
        from node.fleet import UnitView

        for node in self._inventory(d):
            view = self.monitor.views.get(node.unit)
            if view is None or view.node.url != node.url:
                self.monitor.views[node.unit] = UnitView(node)

    async def close(self) -> None:
        if self._serve_task is not None:
            await asyncio.wait({self._serve_task})
            if not self._serve_task.cancelled() and (exc := self._serve_task.exception()) is not None:
                _say(f"the fleet dashboard failed: {type(exc).__name__}: {exc}")
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def _run_simulated(args: argparse.Namespace, scenario: Any, err: Console) -> dict[str, Any] | int:
    from simulations.drill import Options, run_drill

    opts = Options(
        scenario=scenario,
        nodes=args.nodes,
        seed=args.seed,
        workers=args.workers,
        minutes=args.minutes,
        dossiers=args.dossiers,
        drain_s=args.drain_s,
        work_dir=args.work_dir,
        keep=args.keep,
    )
    if not args.json:
        minutes = args.minutes if args.minutes is not None else scenario.minutes
        err.print(
            f"drill [bold]{scenario.name}[/]: {args.nodes} nodes, seed {args.seed}, "
            f"{scenario.hours:g} simulated hours in {minutes:g} real minutes"
        )

    async def main() -> dict[str, Any]:
        bar = FleetBar(err, args.dashboard, quiet=False)
        try:
            with bar:
                return await run_drill(opts, bar.update)
        finally:
            await bar.close()

    try:
        result: dict[str, Any] | int = _run_until_signal(main)
    except RuntimeError as exc:
        err.print(f"wardsync drill: {exc}")
        return EXIT_FAILED
    return result


def _run_live(args: argparse.Namespace, scenario: Any, err: Console) -> dict[str, Any] | int:
    live = _live()
    if live is None:
        return EXIT_CONFIG
    try:
        opts = live.LiveOptions(inventory=args.fleet, scenario=scenario, minutes=args.minutes, seed=args.seed)
        progress = Progress(TextColumn("[bold]{task.fields[phase]:<40.40}"), TimeElapsedColumn(), console=err)
        task = progress.add_task("live drill", total=None, phase="starting")

        def update(d: Any) -> None:
            progress.update(task, phase=str(getattr(d, "now_phase", "")))

        async def main() -> dict[str, Any]:
            with progress:
                r: dict[str, Any] = await live.run_live(opts, update)
                return r

        result: dict[str, Any] | int = _run_until_signal(main)
    except ValueError as exc:  # a bad inventory or a scenario a live fleet cannot play
        print(f"wardsync drill: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return result


# -- the outcome ---------------------------------------------------------------------------------------
def json_figures(r: dict[str, Any], report: Path | None) -> dict[str, Any]:
    """What ``--json`` prints: the checker's figures with the run's identity and verdict."""
    return {
        "scenario": r.get("scenario"),
        "seed": r.get("seed"),
        "version": r.get("version"),
        "nodes": r.get("nodes"),
        "ok": r.get("ok"),
        "invariants": r.get("invariants"),
        "timings": r.get("timings"),
        "report": None if report is None else str(report),
        **r.get("checker", {}),
    }


def summary_table(r: dict[str, Any]) -> Table:
    from simulations.report import summary_rows

    verdict = "[green]PASSED[/]" if r.get("ok") else "[red]FAILED[/]"
    table = Table(
        title=f"drill {r.get('scenario')}, seed {r.get('seed')}, {r.get('nodes')} nodes: {verdict}",
        title_justify="left",
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("invariant")
    for figure, value, check in summary_rows(r):
        style = {"ok": "[green]ok[/]", "VIOLATED": "[red bold]VIOLATED[/]"}.get(check, check)
        table.add_row(figure, value, style)
    return table


def finish(r: dict[str, Any], args: argparse.Namespace, baseline: dict[str, Any] | None, err: Console) -> int:
    report_dir: Path | None = args.report
    if report_dir is not None:
        from simulations.report import write_report

        t = time.monotonic()
        files = write_report(r, report_dir, baseline)
        if not args.json:
            err.print(f"report: {files['html']} ({time.monotonic() - t:.1f} s)")
    out = Console(stderr=True) if args.json else Console()
    out.print(summary_table(r))
    with contextlib.suppress(Exception):
        for e in r.get("errors") or []:
            err.print(f"  [yellow]{e}[/]")
    if args.json:
        print(json.dumps(json_figures(r, report_dir), ensure_ascii=False, indent=1, default=str))
    return 0 if r.get("ok") else EXIT_VIOLATED
