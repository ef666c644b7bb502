"""``wardsync import FILE``: load dossiers exported from the pre-merger units' systems.

The import writes to the node's store directly and holds the data-directory lock while it runs, so the
node must be stopped (it works offline: nothing is sent by the import itself). Old unit codes are mapped
to the new units by the shipped conversion table; only dossiers of this node's unit are imported. Every
imported dossier is looked up on the national portal by the node, when it runs again, before it is
pushed there (see node/legacy.py).

Exit status: 0 every row imported or already present, 1 some rows rejected (the others imported, the
rejects file says why), 2 the configuration or the file cannot be used (nothing imported), 3 the data
directory is in use (stop the node first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

EXIT_REJECTS = 1
EXIT_CONFIG = 2
EXIT_BUSY = 3
DEFAULT_CONFIG = "wardsync.toml"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "import",
        help="load dossiers exported from the pre-merger units' systems (CSV or JSON); the node must be stopped",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="the export: CSV (one row per dossier) or JSON (a list of records)")
    p.add_argument(
        "--config",
        default=os.environ.get("WARDSYNC_CONFIG", DEFAULT_CONFIG),
        help=f"the node's TOML configuration (default: $WARDSYNC_CONFIG or ./{DEFAULT_CONFIG})",
    )
    p.add_argument("--data-dir", help="store directory, overrides the file (as for 'wardsync serve')")
    p.add_argument("--format", choices=["csv", "json"], help="format of FILE (default: from its extension)")
    p.add_argument(
        "--rejects",
        help="file for the rejected rows with their reasons: CSV, or JSON lines if it ends in .jsonl"
        " (default: FILE's name with .rejects.csv or .rejects.jsonl, written when a row is rejected)",
    )
    p.add_argument("--dry-run", action="store_true", help="check and count everything, write nothing to the store")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_import)


def _rejects_path(args: argparse.Namespace, source: Path, fmt: str) -> Path:
    if args.rejects:
        return Path(args.rejects)
    return source.with_name(source.stem + (".rejects.jsonl" if fmt == "json" else ".rejects.csv"))


def _cmd_import(args: argparse.Namespace) -> int:
    from node import legacy
    from node.config import ConfigError, load_config
    from node.logs import configure
    from node.ops import lock
    from node.store import SchemaTooNew, StoreError

    configure("warning", "auto")  # standard output carries the summary; warnings go to standard error
    err = Console(stderr=True)
    try:
        config = load_config(args.config, overrides={"node": {"data_dir": args.data_dir}})
    except ConfigError as exc:
        print(f"wardsync import: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    source = Path(args.file)
    fmt = legacy.format_of(source, args.format)
    try:
        rows = legacy.read_rows(source, fmt)
    except legacy.ImportFileError as exc:
        print(f"wardsync import: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    columns = list(dict.fromkeys(k for r in rows for k in r.raw if not k.startswith("_")))
    try:
        with lock.hold(config.data_path, "import"), Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err,
            disable=args.json or not err.is_terminal,
        ) as progress:
            task = progress.add_task("checking" if args.dry_run else "importing", total=len(rows))
            summary = asyncio.run(
                _run(config, rows, dry_run=args.dry_run, advance=lambda n: progress.advance(task, n))
            )
    except lock.DataDirBusy as exc:
        print(f"wardsync import: {exc}; stop the node, import, then start it again", file=sys.stderr)
        return EXIT_BUSY
    except (SchemaTooNew, StoreError, OSError) as exc:
        print(f"wardsync import: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    rejects = _rejects_path(args, source, fmt)
    if summary.rejected or args.rejects:
        legacy.write_rejects(rejects, summary.rejected, columns)
    result = summary.as_dict()
    if summary.rejected or args.rejects:
        result["rejects_file"] = str(rejects)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        _render(result, summary, Console())
    return EXIT_REJECTS if summary.rejected else 0


async def _run(config: Any, rows: list[Any], *, dry_run: bool, advance: Any) -> Any:
    from node import legacy
    from node.ops.recover import offline_node

    async with offline_node(config) as node:
        return await legacy.import_rows(
            node.store,
            node.service,
            rows,
            unit=config.node.unit,
            clock=node.clock,
            dry_run=dry_run,
            progress=advance,
        )


def _render(result: dict[str, Any], summary: Any, console: Console) -> None:
    verb = "would be imported" if result["dry_run"] else "imported"
    console.print(
        f"read {result['read']}, {verb} {result['imported']}, already present {result['already_present']},"
        f" rejected {result['rejected']}"
    )
    for r in sorted(summary.rejected, key=lambda r: r.line)[:10]:
        line = f"  line {r.line} {r.code or '(no code)'}: {r.reason}"
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if len(summary.rejected) > 10:
        console.print(f"  … and {len(summary.rejected) - 10} more")
    if "rejects_file" in result:
        console.print(
            f"rejected rows and their reasons: {result['rejects_file']}", markup=False, highlight=False, soft_wrap=True
        )
    if result["imported"] and not result["dry_run"]:
        console.print(
            "the node looks each imported dossier up on the national portal before pushing it there", highlight=False
        )
