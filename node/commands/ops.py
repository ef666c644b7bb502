"""``wardsync backup|restore|bootstrap|merge-store|doctor``: the ward IT staff's tools for a node's store."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from adapters.base import UpstreamError
from node.config import Config, ConfigError, load_config
from node.logs import configure
from node.store import SchemaTooNew, StoreError

EXIT_FAILED = 1
EXIT_CONFIG = 2


def register(sub: Any) -> None:
    p = sub.add_parser("backup", help="take a consistent copy of the store while the node runs, and verify it")
    _common(p)
    p.add_argument("--to", required=True, help="directory to write the backup into (created if missing)")
    p.add_argument("--force", action="store_true", help="replace a backup already in that directory")
    p.set_defaults(func=_backup)

    p = sub.add_parser("restore", help="put a backup in place of the store (the node must be stopped)")
    _common(p)
    p.add_argument("--from", dest="source", required=True, help="backup directory written by 'wardsync backup'")
    p.add_argument("--force", action="store_true", help="replace an existing store (it is kept aside)")
    p.add_argument("--offline", action="store_true", help="do not ask the upstreams for what changed since")
    p.set_defaults(func=_restore)

    p = sub.add_parser("bootstrap", help="rebuild a lost store from what the upstreams hold for this unit")
    _common(p)
    p.add_argument("--from", dest="source", required=True, choices=["city", "national"], help="upstream to use")
    p.add_argument("--force", action="store_true", help="rebuild even though a store exists (it is kept aside)")
    p.set_defaults(func=_bootstrap)

    p = sub.add_parser("merge-store", help="merge the dossiers of an old store (a disk that came back) into this one")
    _common(p)
    p.add_argument("old", help="the old data directory (or its wardsync.sqlite3)")
    p.set_defaults(func=_merge_store)

    p = sub.add_parser("doctor", help="check what usually breaks a ward server; exit 1 on any failure")
    _common(p)
    p.add_argument("--min-free-mb", type=float, default=1024.0, help="free space below this fails (default 1024)")
    p.add_argument("--min-free-inodes", type=int, default=10_000, help="free inodes below this fail (default 10000)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per upstream check (default 5)")
    p.set_defaults(func=_doctor)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the node's TOML configuration file")
    p.add_argument("--data-dir", help="store directory, overrides the file (as for 'wardsync serve')")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _config(args: argparse.Namespace) -> Config:
    configure("warning", "auto")  # standard output carries the report; warnings go to standard error
    return load_config(args.config, overrides={"node": {"data_dir": args.data_dir}})


def _config_or_exit(args: argparse.Namespace, cmd: str) -> Config:
    """The configuration, or the problems on standard error and exit status EXIT_CONFIG."""
    try:
        return _config(args)
    except ConfigError as exc:
        print(f"wardsync {cmd}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from exc


def _fail(cmd: str, exc: BaseException | str) -> int:
    print(f"wardsync {cmd}: {exc}", file=sys.stderr)
    return EXIT_FAILED


def _print(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print("\n".join(lines))


def _backup(args: argparse.Namespace) -> int:
    from node.ops.backup import BackupError, backup

    try:
        config = _config(args)
        manifest = backup(config, Path(args.to), force=args.force)
    except ConfigError as exc:
        print(f"wardsync backup: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (BackupError, OSError) as exc:
        return _fail("backup", exc)
    except Exception as exc:  # sqlite3.Error and the like: the message is what the operator needs
        return _fail("backup", f"{type(exc).__name__}: {exc}")
    counts = manifest["counts"]
    _print(args, manifest, [
        f"backup written to {args.to} and verified (integrity ok, sha256 {manifest['sha256'][:16]}…)",
        f"  schema version {manifest['schema_version']}, journal head {manifest['journal_head']},"
        f" {counts.get('dossiers', 0)} dossiers, {manifest['bytes']} bytes",
    ])
    return 0


def _sources_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for s in report["sources"]:
        if s["error"]:
            lines.append(f"  {s['target']}: could not be read ({s['error']})")
            continue
        lines.append(
            f"  {s['target']}: lists {s['listed']} dossiers; {s['created']} recovered, {s['updated']} brought up to"
            f" date, {s['kept']} already held; {s['in_sync']} match it (never pushed again),"
            f" {s['to_push']} differ (pushed as updates)" + (f"; {s['refused']} refused" if s["refused"] else "")
        )
    return lines


def _restore(args: argparse.Namespace) -> int:
    from node.ops import lock
    from node.ops.backup import BackupError, restore_files
    from node.ops.recover import after_restore

    config = _config_or_exit(args, "restore")
    try:
        with lock.hold(config.data_path, "restore"):
            restored = restore_files(config, Path(args.source), force=args.force)
            result: dict[str, Any] = {"manifest": restored.manifest, "replaced": str(restored.replaced or "")}
            lines = [f"restored the backup of {restored.manifest['created_at']} into {config.db_path}"]
            if restored.replaced is not None:
                lines.append(f"  the store that was there is kept in {restored.replaced}")
            if (config.national or config.city) and not args.offline:
                report = asyncio.run(after_restore(config))
                result["catch_up"] = report
                lines += ["caught up with the upstreams:", *_sources_lines(report)]
                lines.append(f"  {report['dossiers']} dossiers in the store; day counters raised past every code used")
                reserved = report["reserved"]
                lines.append(
                    f"  {reserved['count']} codes of today, {reserved['first']} to {reserved['last']}, are left unused:"
                    " dossiers accepted after the backup and never pushed may hold them"
                )
                if not report["complete"]:
                    lines.append("  not every upstream answered: the node asks again for used codes when it starts")
            else:
                lines.append("  the upstreams were not asked: the node asks them for used codes when it starts")
    except lock.DataDirBusy as exc:
        return _fail("restore", f"{exc}: a running node's store cannot be replaced; stop it first "
                                "(systemctl stop wardsync)")
    except ConfigError as exc:
        print(f"wardsync restore: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (BackupError, SchemaTooNew, StoreError, OSError) as exc:
        return _fail("restore", exc)
    _print(args, result, lines)
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    from node.ops import lock
    from node.ops.backup import BackupError, set_aside
    from node.ops.recover import bootstrap

    config = _config_or_exit(args, "bootstrap")
    if getattr(config, args.source) is None:
        print(f"wardsync bootstrap: [targets.{args.source}] is not configured", file=sys.stderr)
        return EXIT_CONFIG
    try:
        with lock.hold(config.data_path, "bootstrap"):
            if config.db_path.exists():
                if not args.force:
                    return _fail("bootstrap", f"a store already exists at {config.db_path}; bootstrap rebuilds a"
                                 " lost one. Pass --force to set it aside and rebuild, or use 'restore'/'merge-store'")
                set_aside(config)
            try:
                report = asyncio.run(bootstrap(config, args.source))
            except (UpstreamError, TimeoutError) as exc:
                set_aside(config, discard=True)  # half a store is worse than none: the node would serve it
                return _fail("bootstrap", f"the {args.source} upstream could not be read ({exc}); nothing was kept")
    except lock.DataDirBusy as exc:
        return _fail("bootstrap", f"{exc}; stop it first")
    except (BackupError, SchemaTooNew, StoreError, OSError) as exc:
        return _fail("bootstrap", exc)
    lines = [f"rebuilt {config.db_path} from the {args.source} upstream:", *_sources_lines(report)]
    lines.append(f"  {report['dossiers']} dossiers in the store; day counters raised past every code used")
    if report["gap_count"]:
        lines.append(
            f"  {report['gap_count']} codes of this unit are missing from every upstream (may be unrecoverable):"
            f" {', '.join(report['gaps'][:20])}" + (" …" if report["gap_count"] > 20 else "")
        )
    if report.get("incomplete"):
        lines.append(
            f"  {len(report['incomplete'])} dossiers reached the portal without their steps and no other upstream"
            f" holds them, so they were not rebuilt (may be unrecoverable): {', '.join(report['incomplete'][:20])}"
            + (" …" if len(report["incomplete"]) > 20 else "")
        )
    lines.append(
        f"  last code any upstream holds: {report['last_code'] or 'none'}. A dossier accepted after the last"
        " push before the disk was lost is unknown upstream and cannot be recovered from it; if the old disk"
        " returns, run 'wardsync merge-store OLD_DIR'."
    )
    if reserved := report.get("reserved"):
        lines.append(
            f"  {reserved['count']} codes of today, {reserved['first']} to {reserved['last']}, are left unused so that"
            " a new intake never takes the code of such a dossier"
        )
    _print(args, report, lines)
    return 0


def _merge_store(args: argparse.Namespace) -> int:
    from node.ops import lock
    from node.ops.recover import merge_store

    config = _config_or_exit(args, "merge-store")
    old = Path(args.old)
    if old.resolve() in (config.data_path.resolve(), config.db_path.resolve()):
        return _fail("merge-store", f"{old} is this node's own store")
    try:
        with lock.hold(config.data_path, "merge-store"):
            report = asyncio.run(merge_store(config, old))
    except lock.DataDirBusy as exc:
        return _fail("merge-store", f"{exc}; stop it first")
    except (SchemaTooNew, StoreError, OSError) as exc:
        return _fail("merge-store", exc)
    except Exception as exc:  # an unreadable old store (sqlite3.Error, a foreign keyring)
        return _fail("merge-store", f"{type(exc).__name__}: {exc}")
    lines = [
        f"merged {report['old_dossiers']} dossiers of {old}: {len(report['created'])} new to this store,"
        f" {len(report['changed'])} brought up to date, {report['unchanged']} already held",
    ]
    if report["created"]:
        lines.append(f"  new: {', '.join(report['created'][:20])}" + (" …" if len(report["created"]) > 20 else ""))
    if report["refused"]:
        lines.append(f"  refused: {', '.join(report['refused'])}")
    if report.get("collisions"):
        lines.append(
            f"  not merged, another dossier holds the code here: {', '.join(report['collisions'])}"
        )
    lines.append("  they reach the upstreams once the node is started")
    _print(args, report, lines)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from node.ops.doctor import Thresholds, print_table, run_checks

    config = _config_or_exit(args, "doctor")
    thresholds = Thresholds(min_free_mb=args.min_free_mb, min_free_inodes=args.min_free_inodes, timeout_s=args.timeout)
    checks = asyncio.run(run_checks(config, thresholds))
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], ensure_ascii=False, indent=2))
    else:
        print_table(checks)
    return EXIT_FAILED if any(c.status == "failure" for c in checks) else 0
