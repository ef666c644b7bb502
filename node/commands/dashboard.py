"""``wardsync fleet-dashboard --fleet FILE``: every unit of a fleet inventory at a glance."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from node.config import split_listen


def register(sub: Any) -> None:
    p = sub.add_parser("fleet-dashboard", help="serve the fleet dashboard for the nodes of an inventory file")
    p.add_argument("--fleet", required=True, help="fleet inventory (TOML, one [[unit]] table per node)")
    p.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT for the dashboard (port 0: any free port)")
    p.set_defaults(func=_cmd_fleet_dashboard)


def _cmd_fleet_dashboard(args: argparse.Namespace) -> int:
    from node.cli import EXIT_CONFIG, _run_until_signal
    from node.fleet import InventoryError, load_inventory, serve_fleet
    from node.logs import configure

    try:
        host, port = split_listen(args.listen)
    except ValueError as exc:
        print(f"wardsync fleet-dashboard: --listen: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        inventory = load_inventory(args.fleet)
    except InventoryError as exc:
        print(f"wardsync fleet-dashboard: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure("warning", "auto")
    return _run_until_signal(
        lambda stop: serve_fleet(inventory, host, port, stop, announce=lambda m: print(m, flush=True))
    )
