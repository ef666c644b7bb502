"""The ``wardsync`` command."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

from node import __version__
from node.commands import keys
from node.config import ConfigError, load_config, render_config, split_listen
from node.registry import get_unit, is_agency_code

EXIT_CONFIG = 2

# Modules under node/commands (and elsewhere) that add subcommands: each exposes register(sub).
COMMAND_MODULES: tuple[str, ...] = (
    "node.commands.tokens",
    "node.commands.status",
    "node.commands.security",
    "node.commands.dashboard",
    "node.commands.keys",
    "node.commands.ops",
    "node.commands.legacy",
    "node.commands.drill",
)


def _cmd_init(args: argparse.Namespace) -> int:
    problems = []
    if get_unit(args.unit) is None:
        problems.append(f"--unit: {args.unit!r} is not one of Ho Chi Minh City's 168 commune-level units")
    if not is_agency_code(args.agency_code):
        problems.append(f"--agency-code: {args.agency_code!r} is not an agency code (e.g. 000.00.17.H29)")
    if problems:
        print("wardsync init: " + "; ".join(problems), file=sys.stderr)
        return EXIT_CONFIG
    key_file = keys.default_key_file(args.out) if args.key_file is None else args.key_file
    text = render_config(
        unit=args.unit,
        agency_code=args.agency_code,
        listen=args.listen,
        data_dir=args.data_dir,
        national_url=args.national_url,
        city_url=args.city_url,
        key_file=key_file,
    )
    if args.out in (None, "-"):
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"wardsync init: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    out.write_text(text, encoding="utf-8")
    # Owner only: it may hold credentials (--national-url, --city-url), and serve refuses such a file when
    # others can read it; an installed node opens it to the service's group (root:wardsync 640).
    os.chmod(out, 0o600)
    print(f"wrote {out}")
    if key_file and keys.ensure_keyring(Path(key_file)):
        print(f"wrote {key_file} (the keyring encrypting dossiers at rest: keep a copy apart from the data)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    # SIGHUP's default action ends the process. Until the event loop takes it over (and remembers a reload
    # asked for during start-up), it is ignored: the configuration is read below, after this point, anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from node.app import serve
    from node.logs import configure

    overrides = {"node": {"listen": args.listen, "data_dir": args.data_dir}}
    try:
        if args.listen:
            split_listen(args.listen)
        config = load_config(args.config, overrides=overrides)
    except (ConfigError, ValueError) as exc:
        print(f"wardsync serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure(config.log.level, config.log.format)
    from node.crypto import KeyringError
    from node.store import SchemaTooNew

    try:
        return _run_until_signal(
            lambda stop: serve(
                config,
                stop=stop,
                announce=lambda m: print(m, flush=True),
                # SIGHUP re-reads the file the same way, flags included (see node/ops/reload.py).
                reload_config=lambda: load_config(args.config, overrides=overrides),
            )
        )
    except (SchemaTooNew, KeyringError) as exc:
        print(f"wardsync serve: {exc}", file=sys.stderr)
        return 1


def _run_until_signal(make: Any) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await make(stop)

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"wardsync: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_sim(args: argparse.Namespace) -> int:
    from node.logs import configure

    configure("info", "auto")
    try:
        host, port = split_listen(args.listen)
    except ValueError as exc:
        print(f"wardsync sim: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.system == "national":
        from simulations.national_portal import serve as serve_national

        return _run_until_signal(
            lambda stop: serve_national(host, port, Path(args.data_dir), stop, announce=lambda m: print(m, flush=True))
        )
    from simulations.city_system import serve as serve_city

    return _run_until_signal(
        lambda stop: serve_city(host, port, Path(args.data_dir), stop, announce=lambda m: print(m, flush=True))
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo
    from node.logs import configure

    configure("warning", "auto")
    host, port = split_listen(args.listen)
    return _run_until_signal(
        lambda stop: run_demo(
            Path(args.data_dir),
            host=host,
            port=port,
            dossiers=args.dossiers,
            stop=stop,
            announce=lambda m: print(m, flush=True),
        )
    )


def _cmd_proxy(args: argparse.Namespace) -> int:
    from simulations.chaos_proxy import serve as serve_proxy
    from simulations.chaos_proxy import split_address

    try:
        for address in (args.listen, args.upstream, args.control):
            split_address(address)
    except ValueError as exc:
        print(f"wardsync proxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return _run_until_signal(
        lambda stop: serve_proxy(
            args.listen, args.upstream, args.control, stop, announce=lambda m: print(m, flush=True)
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wardsync", description="Offline-first dossier sync node for one unit.")
    parser.add_argument("--version", action="version", version=f"wardsync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a commented configuration file")
    p.add_argument("--unit", required=True, help="5-digit statistical code of the unit (e.g. 26743)")
    p.add_argument("--agency-code", required=True, help="electronic agency code (mã định danh)")
    p.add_argument("--out", help="file to write (default: standard output)")
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT for the HTTP API")
    p.add_argument("--data-dir", default="./data", help="directory for the store")
    p.add_argument("--national-url", help="national portal URL (fills in the stand-in's default credentials)")
    p.add_argument("--city-url", help="city system URL (fills in the stand-in's default credentials)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument("--key-file", help="keyring encrypting dossiers at rest (default: beside --out; '' for none)")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("serve", help="run the node daemon")
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.add_argument("--listen", help="HOST:PORT, overrides the file")
    p.add_argument("--data-dir", help="store directory, overrides the file")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("sim", help="run an upstream stand-in (national portal or city system)")
    p.add_argument("system", choices=["national", "city"])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    p.add_argument("--data-dir", required=True, help="directory for the stand-in's own store")
    p.set_defaults(func=_cmd_sim)

    p = sub.add_parser("demo", help="both stand-ins and a node wired to them, on loopback")
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT for the node")
    p.add_argument("--data-dir", default="./data/demo", help="directory for all three stores")
    p.add_argument("--dossiers", type=int, default=5, help="sample dossiers to accept at start")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("proxy", help="a TCP proxy that injects network faults in front of a stand-in")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT for clients (port 0: any free port)")
    p.add_argument("--upstream", required=True, help="HOST:PORT of the stand-in behind the proxy")
    p.add_argument("--control", default="127.0.0.1:0", help="HOST:PORT for the control API (POST/GET/DELETE /mode)")
    p.set_defaults(func=_cmd_proxy)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
