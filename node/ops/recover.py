"""Getting a store back: catching a restored store up with the upstreams, rebuilding a lost one from them
(bootstrap), and merging an old store's dossiers into the current one (merge-store).

What the upstreams already hold is recorded in ``replication`` as acknowledged (with the ack each adapter
keeps: the city's state vector, the portal's record digest and step keys), so nothing they hold is pushed
again, least of all as a create. Day counters are raised past every code they hold for the unit, so no
code is minted twice. A rebuilt store also leaves a block of today's codes unused: dossiers accepted after
the last push before the disk was lost hold codes no upstream knows, and a new intake must not take one
(``merge-store`` would otherwise find two citizens' dossiers under one code when the old disk returns).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pycrdt
import structlog

from adapters.base import Upstream, UpstreamError
from node import tls
from node.clock import iso, local
from node.config import Config
from node.errors import ApiError
from node.service import Merge
from sync.merge import lacks_steps, portal_update
from sync.statevector import decode_state_vector

if TYPE_CHECKING:
    from node.app import Node

log = structlog.get_logger()

FEED_PAGE = 1000
CONCURRENCY = 8
MAX_LISTED_GAPS = 200
# Today's codes a rebuilt store leaves unused past the highest one any upstream holds: at least this many,
# and at least as many as the unit's busiest day the upstreams know of (a whole day of intakes unpushed).
RESERVE_MIN = 100
# Fields that tell two dossiers apart under one code when their Docs share no writer: facts of the intake.
# A clerk may correct the applicant's name or ID number later, so a dossier edited on the old disk and never
# pushed is reported as a collision too: refusing to merge loses nothing, merging two citizens would.
IDENTITY_FIELDS = ("NgayTiepNhan", "MaTTHC", "ChuHoSo", "SoGiayToChuHoSo")


@dataclass
class SourceReport:
    """What one upstream gave back."""

    target: str
    listed: int = 0  # dossiers its feed lists for the unit
    fetched: int = 0
    created: int = 0  # dossiers new to the store
    updated: int = 0  # dossiers the store held, changed by the merge
    kept: int = 0  # held already with the same digest, left alone (a complementary source only fills gaps)
    refused: int = 0
    in_sync: int = 0  # recorded as held by this upstream: never pushed to it again
    to_push: int = 0  # the upstream holds another version: the node pushes its own as an update
    error: str | None = None
    incomplete: list[str] = field(default_factory=list)  # a portal record without its steps: not created
    codes: list[str] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("codes")
        return out


@contextlib.asynccontextmanager
async def upstreams_of(config: Config) -> AsyncIterator[list[Upstream]]:
    """The adapters the configuration names (each with its TLS trust), closed on exit."""
    from adapters.city import CityAdapter
    from adapters.national import NationalAdapter

    sessions: list[aiohttp.ClientSession] = []

    def session_for(target: Any) -> aiohttp.ClientSession:
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls.client_context(target)))
        sessions.append(s)
        return s

    ups: list[Upstream] = []
    if (n := config.national) is not None:
        ups.append(
            NationalAdapter(
                n.url, username=n.username, password=n.password, dstcode=n.dstcode, madonvi=n.madonvi,
                session=session_for(n), timeout_s=n.timeout_s,
            )
        )
    if (c := config.city) is not None:
        ups.append(
            CityAdapter(
                c.url, client_id=c.client_id, client_secret=c.client_secret, session=session_for(c),
                timeout_s=c.timeout_s,
            )
        )
    try:
        yield ups
    finally:
        for up in ups:
            with contextlib.suppress(Exception):
                await up.close()
        for s in sessions:
            await s.close()


@contextlib.asynccontextmanager
async def offline_node(config: Config) -> AsyncIterator[Node]:
    """The node's store and dossier service with no loops running: nothing pushes or pulls on its own."""
    from node.app import Node

    async with Node(config, upstreams=[]) as node:
        yield node


async def _feed(upstream: Upstream, unit: str) -> tuple[list[tuple[str, int]], int]:
    """Every (code, seq) the upstream's feed lists for ``unit``, and the feed's last position."""
    items: list[tuple[str, int]] = []
    since = 0
    while True:
        page = await upstream.feed(unit, since, FEED_PAGE)
        items += [(i.code, i.seq) for i in page.items]
        if len(page.items) < FEED_PAGE or page.next <= since:
            return items, max(since, page.next)
        since = page.next


async def pull(node: Node, upstream: Upstream, *, mode: str, since: int = 0) -> SourceReport:
    """Fetch the unit's dossiers from ``upstream`` and merge them; record what it holds as acknowledged.

    ``mode`` "merge" merges every dossier the feed lists after ``since`` (the store's pull cursor for a
    restore, 0 for a rebuild); "fill" adds dossiers the store lacks, and of a dossier it holds with another
    digest takes only what the first source did not have: the city's history (a CRDT merge), the portal's
    steps, documents and fees (its fields are not written over the first source's). Raises
    :class:`UpstreamError` when the upstream cannot be read.

    A portal record without any step is a dossier whose record reached the portal and whose steps did not
    (the disk was lost between the two calls): a Doc built from it would have no status, and pushing it
    would be refused by the portal and spread a dossier without its history to the city. It is not created
    from the portal; it is listed as ``incomplete`` (the city, or the old disk, can bring it back whole).
    """
    store, service, unit = node.store, node.service, node.config.node.unit
    report = SourceReport(upstream.name)
    listed, head = await _feed(upstream, unit)
    report.listed = len({c for c, _ in listed})
    report.codes = list(dict.fromkeys(c for c, _ in listed))
    wanted = list(dict.fromkeys(c for c, s in listed if s > since))
    portal_cid = await service.client_id_for("national") if upstream.name == "national" else None
    remote: dict[str, tuple[str, bytes | None]] = {}
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(code: str) -> None:
        async with gate:
            row = await store.fetchone("SELECT state, record, digest FROM dossiers WHERE code = ?", (code,))
            state = store.sealer.state(code, row[0]) if row is not None else None
            sv = pycrdt.get_state(state) if state is not None and upstream.name == "city" else None
            fetched = await upstream.fetch(code, sv)
        if fetched is None:
            return
        report.fetched += 1
        if fetched.record is not None:
            from adapters.national import ack_for

            remote[code] = (fetched.digest, ack_for(fetched.record))
        else:
            remote[code] = (fetched.digest, fetched.state_vector)
        if row is None and fetched.record is not None and lacks_steps(fetched.record):
            report.incomplete.append(code)
            log.warning("recover_incomplete", target=upstream.name, code=code)
            return
        fill = row is not None and mode == "fill"
        if fill and str(row[2]) == fetched.digest:
            report.kept += 1
            if fetched.record is not None:  # what the portal holds is the base of later three-way merges
                await service.merge(Merge(code, b"", upstream.name, base=dict(fetched.record)))
            return
        if fetched.update is not None:
            op = Merge(code, fetched.update, upstream.name)
        elif fetched.record is not None:
            local = json.loads(store.sealer.record(code, row[1])) if row is not None else None
            if fill:  # the portal's record as the base: only its steps, documents and fees are taken
                base: dict[str, Any] | None = dict(fetched.record)
            else:
                base_row = await store.fetchone("SELECT record FROM portal_base WHERE code = ?", (code,))
                base = json.loads(store.sealer.base(code, base_row[0])) if base_row is not None else None
            assert portal_cid is not None
            update = portal_update(
                code, state, local, base, fetched.record, client_id=portal_cid, hlc=service.hlc
            )
            op = Merge(code, update or b"", upstream.name, base=dict(fetched.record))
        else:
            return
        try:
            result = await service.merge(op)
        except ApiError as exc:
            report.refused += 1
            log.error("recover_refused", target=upstream.name, code=code, reason=exc.message)
            return
        if row is None:
            report.created += 1
        elif result.status == 201 and op.update:
            report.updated += 1

    async with asyncio.TaskGroup() as tg:
        for code in wanted:
            tg.create_task(one(code))
    # The feed is read up to here: the node's puller goes on from this position.
    await service.merge(Merge("", b"", upstream.name, cursor=(upstream.name, head)))
    report.in_sync, report.to_push = await record_held(node, upstream.name, remote)
    return report


async def record_held(node: Node, target: str, remote: dict[str, tuple[str, bytes | None]]) -> tuple[int, int]:
    """Write what ``target`` holds into ``replication``: acknowledged where its digest is ours, else pending.

    A pending row keeps the upstream's own ack, so the push that follows is an update (the portal) or the
    missing diff (the city), not a create.
    """
    if not remote:
        return 0, 0
    codes = list(remote)
    local: dict[str, str] = {}
    for i in range(0, len(codes), 500):
        chunk = codes[i : i + 500]
        marks = ",".join("?" for _ in chunk)
        for code, digest in await node.store.fetchall(
            f"SELECT code, digest FROM dossiers WHERE code IN ({marks})", chunk
        ):
            local[str(code)] = str(digest)
    at = iso(node.clock.now())
    rows: list[tuple[Any, ...]] = []
    held = 0
    for code, (digest, ack) in remote.items():
        mine = local.get(code)
        if mine is None:
            continue
        same = mine == digest
        held += same
        rows.append(
            (target, code, "synced" if same else "pending", mine, mine if same else None, ack, 0, None, 0, at)
        )

    def write(conn: sqlite3.Connection) -> None:
        conn.executemany(
            "INSERT INTO replication (target, code, state, digest, acked_digest, ack, attempts, last_error,"
            " next_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (target, code) DO UPDATE SET state = excluded.state, digest = excluded.digest,"
            " acked_digest = excluded.acked_digest, ack = excluded.ack, attempts = 0, last_error = NULL,"
            " next_at = 0, updated_at = excluded.updated_at",
            rows,
        )

    await node.store.write(write)
    return held, len(rows) - held


def sequence_gaps(codes: Iterable[str], agency: str) -> tuple[list[str], str | None]:
    """Codes of ``agency`` missing inside each day's sequence, and the highest code seen."""
    prefix = f"{agency}-"
    days: dict[str, set[int]] = {}
    for code in codes:
        if not code.startswith(prefix):
            continue
        day, _, seq = code[len(prefix) :].partition("-")
        if len(day) == 6 and day.isdigit() and seq.isdigit():
            days.setdefault(day, set()).add(int(seq))
    gaps = [f"{prefix}{day}-{n:04d}" for day in sorted(days) for n in range(1, max(days[day])) if n not in days[day]]
    last = None
    if days:
        day = max(days)
        last = f"{prefix}{day}-{max(days[day]):04d}"
    return gaps, last


async def _set_meta(node: Node, key: str, value: str | None) -> None:
    def write(conn: sqlite3.Connection) -> None:
        if value is None:
            conn.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    await node.store.write(write)


async def catch_up(node: Node, upstreams: list[Upstream], *, modes: dict[str, str], required: str | None = None
                   ) -> dict[str, Any]:
    """Pull from each upstream in turn, seed the counters from every code they list, report.

    ``required`` names an upstream whose failure raises; the others' failures are reported. When any
    upstream could not be read the store keeps ``seed_counters = pending``, so the node asks again at start.
    """
    reports: list[SourceReport] = []
    for up in upstreams:
        mode = modes.get(up.name)
        if mode is None:
            continue
        cursor = 0
        if mode == "merge":
            row = await node.store.fetchone("SELECT seq FROM pull_cursors WHERE target = ?", (up.name,))
            cursor = int(row[0]) if row else 0
        started = time.monotonic()
        try:
            report = await pull(node, up, mode=mode, since=cursor)
        except (UpstreamError, TimeoutError) as exc:
            if up.name == required:
                raise
            report = SourceReport(up.name, error=str(exc) or "timed out")
            log.warning("recover_upstream_unreachable", target=up.name, error=report.error)
        else:
            log.info("recovered_from", seconds=round(time.monotonic() - started, 2), **report.as_dict())
        reports.append(report)
    codes = [c for r in reports for c in r.codes]
    seeded = await node.service.seed_counters(codes)
    local = [str(r[0]) for r in await node.store.fetchall("SELECT code FROM dossiers")]
    gaps, last = sequence_gaps([*codes, *local], node.config.node.agency_code)
    held = set(local)
    incomplete = sorted({c for r in reports for c in r.incomplete if c not in held})
    complete = bool(reports) and all(r.error is None for r in reports)
    await _set_meta(node, "seed_counters", None if complete else "pending")
    return {
        "sources": [r.as_dict() for r in reports],
        "dossiers": len(local),
        "counters": seeded,
        "gaps": gaps[:MAX_LISTED_GAPS],
        "gap_count": len(gaps),
        "incomplete": incomplete,
        "last_code": last,
        "complete": complete,
    }


def busiest_day(codes: Iterable[str], agency: str) -> int:
    """The highest sequence number among ``agency``'s codes: the most dossiers the unit took in one day."""
    prefix = f"{agency}-"
    best = 0
    for code in codes:
        if code.startswith(prefix):
            day, _, seq = code[len(prefix) :].partition("-")
            if len(day) == 6 and day.isdigit() and seq.isdigit():
                best = max(best, int(seq))
    return best


async def reserve_today(node: Node, codes: Iterable[str]) -> dict[str, Any]:
    """Raise today's counter by a block of codes that stay unused, past every code the store knows.

    The codes of dossiers accepted after the last push before a disk was lost are known to nobody; they
    lie just past the highest code the upstreams hold for today. Skipping a block keeps a new intake off
    them, so the old disk, if it returns, merges back without a collision.
    """
    agency = node.config.node.agency_code
    day = local(node.clock.now()).strftime("%y%m%d")
    row = await node.store.fetchone("SELECT last FROM day_counters WHERE agency = ? AND day = ?", (agency, day))
    start = int(row[0]) if row else 0
    count = max(RESERVE_MIN, busiest_day(codes, agency))
    last = start + count
    await node.service.seed_counters([f"{agency}-{day}-{last:04d}"])
    return {"day": day, "first": f"{agency}-{day}-{start + 1:04d}", "last": f"{agency}-{day}-{last:04d}",
            "count": count}


async def bootstrap(config: Config, source: str) -> dict[str, Any]:
    """Rebuild an empty store from the upstreams; ``source`` must answer, the other is used when it does.

    The city system is read first whichever is the source: it keeps each dossier's CRDT history, so the
    Docs come back as they were. The portal then adds what the city lacks (dossiers, steps, documents and
    fees). The other way round, a Doc built from the portal's record and then merged with the city's Doc
    of the same dossier holds its steps twice over, from two writers with differently derived stamps; such
    a merge was seen to give a digest that neither upstream held.
    """
    async with upstreams_of(config) as ups, offline_node(config) as node:
        ordered = sorted(ups, key=lambda u: u.name != "city")
        modes = {u.name: "merge" if i == 0 else "fill" for i, u in enumerate(ordered)}
        report = await catch_up(node, ordered, modes=modes, required=source)
        report["source"] = source
        report["client_id"] = node.service.client_id
        known = [str(r[0]) for r in await node.store.fetchall("SELECT code FROM dossiers")]
        report["reserved"] = await reserve_today(node, known)
        await _set_meta(node, "bootstrap", json.dumps({"gaps": report["gaps"], "last_code": report["last_code"],
                                                       "reserved": report["reserved"]}))
        return report


async def after_restore(config: Config) -> dict[str, Any]:
    """Catch a restored store up: merge what the upstreams gained since the backup, city first.

    Like a rebuilt store, a restored one leaves a block of today's codes unused: dossiers accepted after the
    backup and never pushed are known to nobody, and a new intake must not take their codes.
    """
    async with upstreams_of(config) as ups, offline_node(config) as node:
        ordered = sorted(ups, key=lambda u: u.name != "city")
        report = await catch_up(node, ordered, modes={u.name: "merge" for u in ups})
        report["client_id"] = node.service.client_id
        known = [str(r[0]) for r in await node.store.fetchall("SELECT code FROM dossiers")]
        report["reserved"] = await reserve_today(node, known)
        return report


def _copy_store(old: Path, into: Path) -> Path:
    """Copy a store with its WAL files, so opening the copy recovers committed transactions in the WAL."""
    db = old / "wardsync.sqlite3" if old.is_dir() else old
    if not db.exists():
        raise FileNotFoundError(f"no store at {db}")
    for suffix in ("", "-wal", "-shm"):
        src = db.with_name(db.name + suffix)
        if src.exists():
            shutil.copyfile(src, into / ("old.sqlite3" + suffix))
    return into / "old.sqlite3"


async def merge_store(config: Config, old: Path) -> dict[str, Any]:
    """Merge every dossier of an old store into this node's store as CRDT merges; they then replicate."""
    from node import crypto

    with tempfile.TemporaryDirectory(prefix="wardsync-merge-") as tmp:
        copy = _copy_store(old, Path(tmp))
        sealer = crypto.sealer_for(config.node.key_file)
        with contextlib.closing(sqlite3.connect(copy, isolation_level=None)) as conn:
            rows = []
            old_records: dict[str, dict[str, Any]] = {}
            for c, s, r in conn.execute("SELECT code, state, record FROM dossiers"):
                rows.append((str(c), sealer.state(str(c), s)))
                old_records[str(c)] = json.loads(sealer.record(str(c), r))
            counters = [
                (str(a), str(d), int(n)) for a, d, n in conn.execute("SELECT agency, day, last FROM day_counters")
            ]
    created: list[str] = []
    merged: list[str] = []  # held already, and the old Doc added to its history
    refused: list[str] = []
    async with offline_node(config) as node:
        held: dict[str, dict[str, Any]] = {}
        digests: dict[str, str] = {}
        writers: dict[str, set[int]] = {}
        for c, st, r, d in await node.store.fetchall("SELECT code, state, record, digest FROM dossiers"):
            code = str(c)
            held[code], digests[code] = json.loads(node.store.sealer.record(code, r)), str(d)
            writers[code] = _writers(node.store.sealer.state(code, st))
        # The same code on another citizen's dossier (minted again after the disk was lost) is never merged:
        # one Doc would end up holding two dossiers. Docs with a writer in common are one dossier's.
        collisions = sorted(
            code for code, state in rows
            if code in held and not writers[code] & _writers(state)
            and _identity(held[code]) != _identity(old_records[code])
        )
        for code in collisions:
            log.error("merge_store_collision", code=code, held=_identity(held[code]), old=_identity(old_records[code]))
        rows = [(code, state) for code, state in rows if code not in collisions]
        results = await asyncio.gather(
            *(node.service.merge(Merge(code, state, "merge-store")) for code, state in rows), return_exceptions=True
        )
        for (code, _), result in zip(rows, results, strict=True):
            if isinstance(result, ApiError):
                refused.append(code)
                log.error("merge_store_refused", code=code, reason=result.message)
            elif isinstance(result, BaseException):
                raise result
            elif code not in held:
                created.append(code)
            elif result.status == 201:
                merged.append(code)

        def raise_counters(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT INTO day_counters (agency, day, last) VALUES (?, ?, ?)"
                " ON CONFLICT (agency, day) DO UPDATE SET last = max(last, excluded.last)",
                counters,
            )

        await node.store.write(raise_counters)
        # Brought up to date: the content changed (a Doc rebuilt from the portal's record gains the old Doc's
        # history without any change to the dossier itself: that one is unchanged).
        changed: list[str] = []
        for i in range(0, len(merged), 500):
            chunk = merged[i : i + 500]
            marks = ",".join("?" for _ in chunk)
            for c, d in await node.store.fetchall(f"SELECT code, digest FROM dossiers WHERE code IN ({marks})", chunk):
                if str(d) != digests[str(c)]:
                    changed.append(str(c))
        boot = await node.store.get_meta("bootstrap")
        # After a rebuild, a dossier new to the store is one the upstreams never had: lost, and now found again
        # (the gaps the bootstrap reported, and codes past the last one any upstream held).
        return {
            "old_dossiers": len(rows) + len(collisions),
            "created": sorted(created),
            "changed": sorted(changed),
            "refused": sorted(refused),
            "collisions": collisions,
            "unchanged": len(rows) - len(created) - len(changed) - len(refused),
            "found_again": sorted(created) if boot else [],
        }


def _writers(state: bytes) -> set[int]:
    return set(decode_state_vector(pycrdt.get_state(bytes(state))))


def _identity(record: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(record.get(name)) for name in IDENTITY_FIELDS)
