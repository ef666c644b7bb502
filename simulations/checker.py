"""The drill's checker: what the fleet acknowledged against what every replica holds, Jepsen total-queue style.

Inputs are plain data gathered after the drill (:class:`Snapshot`): the desks' acknowledgements (from the
workload driver), each node's store read directly after a clean stop, and both stand-ins' inspection
views. Figures:

- **lost**: an acknowledged dossier missing from the national portal, the city system, its receiving
  unit's node or its competent unit's node, plus acknowledged steps missing from the competent node's
  record (a step there and equal digests everywhere means it is everywhere);
- **duplicated**: one submission stored under two codes (two codes carrying one drill tag, anywhere), a
  step stored twice in a record, and what each stand-in counts as stored twice;
- **unexpected**: a stored dossier the drill never submitted (no tag, or the tag of a dossier never sent);
- **converged**: every dossier has one digest on every replica that holds it.

Dossiers sent but never acknowledged (the answer was lost in a crash) may or may not be stored; they are
counted as ``in_doubt``, not as violations. Failover figures (time to detect and to switch per node) come
from the timeline of breaker and active-source changes; lag and backlog from periodic samples.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simulations.workload import tag_of

TARGETS = ("national", "city")


@dataclass
class Snapshot:
    """Everything the checker looks at; JSON-serialisable, so a test can plant faults in a copy."""

    # dossier id -> {"unit", "competent", "code"?}, for every dossier the drill attempted ("code": an online
    # submission's code on the portal, known before any answer)
    attempted: dict[str, dict[str, str]] = field(default_factory=dict)
    acked: dict[str, str] = field(default_factory=dict)  # dossier id -> code
    acked_steps: dict[str, list[list[Any]]] = field(default_factory=dict)  # id -> [[status, note]]
    # unit -> code -> {"digest", "tag", "notes": [step notes]}
    nodes: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    upstreams: dict[str, dict[str, str]] = field(default_factory=dict)  # target -> code -> digest
    upstream_duplicates: dict[str, int] = field(default_factory=dict)  # target -> stored twice, as counted there
    # {"t", "unit", "kind": "breaker"|"active", "target"?, "new"?, "to"?}
    timeline: list[dict[str, Any]] = field(default_factory=list)
    # {"t", "kind": "fault"|"clear"|..., "target", "units": [...] or None for all, "label"}
    phases: list[dict[str, Any]] = field(default_factory=list)
    lag: list[list[Any]] = field(default_factory=list)  # [t, unit, target, records, seconds]
    t0: float = 0.0
    t_end: float = 0.0  # end of the workload (drain starts)
    primary: str = "national"

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        return cls(**json.loads(text))


def read_node_store(db: Path) -> dict[str, dict[str, Any]]:
    """code -> {digest, tag, notes} from a stopped node's store (read-only)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        out: dict[str, dict[str, Any]] = {}
        for code, record, digest in conn.execute("SELECT code, record, digest FROM dossiers"):
            rec = json.loads(record)
            steps = rec.get("QuaTrinhXuLy") or []
            out[str(code)] = {
                "digest": str(digest),
                "tag": tag_of(rec),
                "notes": [str(s.get("NoiDungXuLy", "")) for s in steps if isinstance(s, dict)],
            }
        return out
    finally:
        conn.close()


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def dist(values: Iterable[float], digits: int = 2) -> dict[str, Any]:
    v = list(values)
    out: dict[str, Any] = {"n": len(v)}
    for name, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100)):
        x = pct(v, q)
        out[name] = None if x is None else round(x, digits)
    return out


def check(s: Snapshot) -> dict[str, Any]:
    """The checker's figures; ``ok`` is true only when every invariant holds."""
    tags_attempted = {f"drill:{i}" for i in s.attempted}
    acked_codes = set(s.acked.values())
    lost: list[dict[str, Any]] = []
    lost_steps: list[dict[str, Any]] = []
    for did, code in sorted(s.acked.items()):
        info = s.attempted.get(did, {})
        missing_from = [t for t in TARGETS if code not in s.upstreams.get(t, {})]
        for unit in {info.get("unit"), info.get("competent")} - {None}:
            assert unit is not None
            if unit in s.nodes and code not in s.nodes[unit]:
                missing_from.append(f"node {unit}")
        if missing_from:
            lost.append({"id": did, "code": code, "missing_from": missing_from})
        competent = info.get("competent")
        on_competent = s.nodes.get(competent or "", {}).get(code)
        if on_competent is not None:
            notes = set(on_competent["notes"])
            missing = [n for _, n in s.acked_steps.get(did, []) if n not in notes]
            if missing:
                lost_steps.append({"id": did, "code": code, "steps": missing})

    duplicated: list[dict[str, Any]] = []
    unexpected: list[dict[str, Any]] = []
    in_doubt: set[str] = set()
    replicas: dict[str, dict[str, str]] = defaultdict(dict)  # code -> replica -> digest
    for unit_code, node_map in s.nodes.items():
        where = f"node {unit_code}"
        by_tag: dict[str, list[str]] = defaultdict(list)
        for code, held in node_map.items():
            replicas[code][where] = held["digest"]
            tag = held.get("tag")
            if tag is not None:
                by_tag[tag].append(code)
            if tag is None or tag not in tags_attempted:
                unexpected.append({"code": code, "at": where, "tag": tag})
            elif code not in acked_codes:
                in_doubt.add(code)
            stored = [n for n in held["notes"] if n]
            if len(stored) != len(set(stored)):
                duplicated.append({"code": code, "at": where, "what": "a step stored twice"})
        for tag, codes in by_tag.items():
            if len(codes) > 1:
                duplicated.append({"tag": tag, "at": where, "codes": sorted(codes)})
    known = set(replicas)
    sent_codes = {str(v["code"]) for v in s.attempted.values() if v.get("code")}
    strays: set[str] = set()  # sent to the portal, never acknowledged, on no node: in doubt, not a replica set
    for target, digests in s.upstreams.items():
        for code, d in digests.items():
            replicas[code][target] = d
            if code not in known and code not in acked_codes:
                if code in sent_codes:
                    # An online submission whose answer never came (its steps may be missing): in doubt.
                    in_doubt.add(code)
                    strays.add(code)
                else:
                    # No node holds it and no desk was told of it: a dossier nobody submitted.
                    unexpected.append({"code": code, "at": target, "tag": None})
    for target, n in s.upstream_duplicates.items():
        if n:
            duplicated.append({"at": target, "what": f"{n} stored twice (the stand-in's own count)"})
    diverged = {
        code: reps
        for code, reps in replicas.items()
        if code not in strays and (len(set(reps.values())) > 1 or not _everywhere(reps, s))
    }
    acked_steps = sum(len(v) for v in s.acked_steps.values())
    result: dict[str, Any] = {
        "acknowledged": len(s.acked),
        "acknowledged_steps": acked_steps,
        "attempted": len(s.attempted),
        "lost": len(lost) + sum(len(x["steps"]) for x in lost_steps),
        "lost_dossiers": len(lost),
        "lost_steps": sum(len(x["steps"]) for x in lost_steps),
        "duplicated": len(duplicated),
        "unexpected": len(unexpected),
        "in_doubt": len(in_doubt),
        "converged": not diverged and bool(replicas),
        "diverged": len(diverged),
        "replicas": {t: len(s.upstreams.get(t, {})) for t in TARGETS}
        | {"nodes": sum(len(m) for m in s.nodes.values())},
        "examples": {
            "lost": lost[:5] + lost_steps[:5],
            "duplicated": duplicated[:5],
            "unexpected": unexpected[:5],
            "diverged": [{"code": c, "digests": r} for c, r in list(diverged.items())[:5]],
        },
    }
    result["failover"] = failover_figures(s)
    result["lag"] = lag_figures(s)
    result["ok"] = (
        result["lost"] == 0 and result["duplicated"] == 0 and result["unexpected"] == 0 and result["converged"]
    )
    return result


def _everywhere(reps: dict[str, str], s: Snapshot) -> bool:
    """A dossier some replica holds must be on both upstreams."""
    return all(t in reps for t in TARGETS if t in s.upstreams)


def failover_figures(s: Snapshot) -> dict[str, Any]:
    """Per fault phase on the primary: per node, seconds from the fault to the breaker opening and to the switch."""
    out: list[dict[str, Any]] = []
    backup = "city" if s.primary == "national" else "national"
    faults = [p for p in s.phases if p.get("kind") == "fault" and p.get("target") in (s.primary, "both")]
    for p in faults:
        t0 = float(p["t"])
        t1 = float(p.get("until") or s.t_end or math.inf)
        scope = set(p["units"]) if p.get("units") else {e["unit"] for e in s.timeline} | set(s.nodes)
        detect: dict[str, float] = {}
        switch: dict[str, float] = {}
        back: dict[str, float] = {}
        for e in sorted(s.timeline, key=lambda e: float(e["t"])):
            u, t = e["unit"], float(e["t"])
            if u not in scope or t < t0:
                continue
            if e["kind"] == "breaker" and e.get("target") == s.primary and e.get("new") == "open" and t <= t1:
                detect.setdefault(u, t - t0)
            if e["kind"] == "active" and e.get("to") == backup and t <= t1:
                switch.setdefault(u, t - t0)
            if e["kind"] == "active" and e.get("to") == s.primary and t > t1 and u in switch:
                back.setdefault(u, t - t1)
        out.append(
            {
                "label": p.get("label", ""),
                "at_s": round(t0 - s.t0, 2),
                "held_s": round(t1 - t0, 2) if math.isfinite(t1) else None,
                "units": len(scope),
                "detected": len(detect),
                "switched": len(switch),
                "failed_back": len(back),
                "detect_s": dist(detect.values()),
                "switch_s": dist(switch.values()),
                "failback_s": dist(back.values()),
                "per_unit": {u: {"detect_s": round(detect[u], 3) if u in detect else None,
                                 "switch_s": round(switch[u], 3) if u in switch else None} for u in sorted(scope)},
            }
        )
    return {"phases": out}


def lag_figures(s: Snapshot, buckets: int = 20) -> dict[str, Any]:
    """Lag percentiles per target overall and over time; the fleet's backlog, its peak and time to drain."""
    out: dict[str, Any] = {}
    if not s.lag:
        return {t: {"seconds": dist([]), "over_time": [], "backlog": [], "peak_backlog": 0, "drain_s": None}
                for t in TARGETS}
    t_first = min(float(x[0]) for x in s.lag)
    t_last = max(float(x[0]) for x in s.lag)
    width = max((t_last - t_first) / buckets, 1e-6)
    for target in TARGETS:
        rows = [x for x in s.lag if x[2] == target]
        per_t: dict[float, float] = defaultdict(float)
        over: dict[int, list[float]] = defaultdict(list)
        for t, _u, _tg, records, seconds in rows:
            per_t[float(t)] += float(records)
            over[min(buckets - 1, int((float(t) - t_first) / width))].append(float(seconds))
        # Each worker samples on its own tick: a backlog point is the sum over one round of samples.
        backlog = _sum_rounds(rows)
        peak = max((b for _, b in backlog), default=0.0)
        t_peak = next((t for t, b in backlog if b == peak), None)
        drain = None
        if t_peak is not None and peak > 0:
            after = [t for t, b in backlog if t >= t_peak and b == 0]
            drain = round(after[0] - t_peak, 2) if after else None
        out[target] = {
            "seconds": dist([float(x[4]) for x in rows]),
            "over_time": [
                {"t": round(t_first + (i + 0.5) * width - s.t0, 2), **dist(over.get(i, []))} for i in range(buckets)
            ],
            "backlog": [[round(t - s.t0, 2), b] for t, b in backlog],
            "peak_backlog": int(peak),
            "peak_at_s": None if t_peak is None else round(t_peak - s.t0, 2),
            "drain_s": drain,
        }
    return out


def _sum_rounds(rows: list[list[Any]]) -> list[tuple[float, float]]:
    """The fleet's total backlog over time: the latest sample of every node, summed at each sample."""
    latest: dict[str, float] = {}
    out: list[tuple[float, float]] = []
    for t, unit, _tg, records, _s in sorted(rows, key=lambda x: float(x[0])):
        latest[str(unit)] = float(records)
        out.append((float(t), sum(latest.values())))
    # Thin to at most ~400 points for the plots.
    step = max(1, len(out) // 400)
    thinned = out[::step]
    if out and thinned[-1] != out[-1]:
        thinned.append(out[-1])
    return thinned
