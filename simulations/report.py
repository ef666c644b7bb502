"""The drill report: ``report.md``, ``report.html``, ``report.json`` and PNG plots in one directory.

Plots: replication lag per target over time, the failover timeline per unit (active source over time,
with the scenario's phases shaded) and the fleet's backlog. With a baseline (an earlier ``report.json``),
the key figures are shown next to it with their change.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt

COLOURS = {"national": "#2b8a3e", "city": "#e67700", None: "#c92a2a"}


def key_figures(r: dict[str, Any]) -> dict[str, Any]:
    """The figures a report compares with a baseline, flat."""
    c = r.get("checker", {})
    out: dict[str, Any] = {
        "ok": r.get("ok"),
        "acknowledged": c.get("acknowledged"),
        "acknowledged_steps": c.get("acknowledged_steps"),
        "lost": c.get("lost"),
        "duplicated": c.get("duplicated"),
        "unexpected": c.get("unexpected"),
        "converged": c.get("converged"),
        "drain_s": _drain(r.get("timings", {}).get("drain_s")),
        "total_s": r.get("timings", {}).get("total_s"),
    }
    for i, p in enumerate(c.get("failover", {}).get("phases", [])):
        out[f"failover[{i}].switched"] = f"{p['switched']}/{p['units']}"
        for k in ("detect_s", "switch_s"):
            out[f"failover[{i}].{k}.p50"] = p[k]["p50"]
            out[f"failover[{i}].{k}.p99"] = p[k]["p99"]
    for target, lag in c.get("lag", {}).items():
        out[f"lag.{target}.p99_s"] = lag["seconds"]["p99"]
        out[f"lag.{target}.peak_backlog"] = lag["peak_backlog"]
        out[f"lag.{target}.drain_s"] = lag["drain_s"]
    if "peak_tree_rss_mb" in r:
        out["peak_tree_rss_mb"] = r["peak_tree_rss_mb"]
    return out


def _drain(v: Any) -> Any:
    """Seconds the drain took; None when it did not finish (the drill writes -1)."""
    return None if isinstance(v, int | float) and v < 0 else v


def deltas(now: dict[str, Any], base: dict[str, Any]) -> list[tuple[str, Any, Any, str]]:
    """(figure, baseline, now, change) for every key figure."""
    a, b = key_figures(base), key_figures(now)
    rows = []
    for k in b:
        old, new = a.get(k), b[k]
        change = ""
        if isinstance(old, int | float) and isinstance(new, int | float) and not isinstance(new, bool):
            diff = new - old
            change = f"{diff:+g}" + (f" ({diff / old * 100:+.0f} %)" if old else "")
        elif old != new:
            change = "changed"
        rows.append((k, old, new, change))
    return rows


def _shade(ax: Any, r: dict[str, Any]) -> None:
    for p in r.get("phases", []):
        if p.get("kind") in ("fault", "kill"):
            end = p.get("until_s")
            if end is None:
                end = p["at_s"] + 1
            ax.axvspan(p["at_s"], end, color="#ffc9c9", alpha=0.35, lw=0)


def plot_lag(r: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for target, lag in r["checker"].get("lag", {}).items():
        pts = [(b["t"], b["p99"]) for b in lag["over_time"] if b["p99"] is not None]
        pts50 = [(b["t"], b["p50"]) for b in lag["over_time"] if b["p50"] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=f"{target} p99", color=COLOURS.get(target))
        if pts50:
            ax.plot(*zip(*pts50, strict=True), label=f"{target} p50", color=COLOURS.get(target), ls="--")
    _shade(ax, r)
    ax.set_xlabel("seconds since the start of the day (real time)")
    ax.set_ylabel("replication lag (s)")
    ax.set_title("Replication lag per target")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_backlog(r: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for target, lag in r["checker"].get("lag", {}).items():
        if lag["backlog"]:
            ax.plot(*zip(*lag["backlog"], strict=True), label=target, color=COLOURS.get(target))
    _shade(ax, r)
    ax.set_xlabel("seconds since the start of the day (real time)")
    ax.set_ylabel("records not yet acknowledged")
    ax.set_title("Fleet backlog per target")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(r: dict[str, Any], path: Path, max_units: int = 60) -> None:
    """Each unit's active source over time (green national, orange city, red none)."""
    events = [e for e in r.get("timeline", []) if e["kind"] == "active"]
    units = sorted({e["unit"] for e in r.get("timeline", [])} | set(r.get("units", [])))[:max_units]
    end = max([r.get("timings", {}).get("day_s") or 0.0] + [e["t"] for e in events] + [1.0])
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.16 * len(units) + 1)))
    for y, unit in enumerate(units):
        current: str | None = "national"
        t_prev = 0.0
        for e in (e for e in events if e["unit"] == unit and e["t"] >= 0):
            ax.barh(y, e["t"] - t_prev, left=t_prev, color=COLOURS.get(current, "#868e96"), height=0.8, lw=0)
            current, t_prev = e["to"], e["t"]
        ax.barh(y, end - t_prev, left=t_prev, color=COLOURS.get(current, "#868e96"), height=0.8, lw=0)
    _shade(ax, r)
    ax.set_yticks(range(len(units)), units, fontsize=6 if len(units) > 20 else 8)
    ax.set_xlabel("seconds since the start of the day (real time)")
    ax.set_title("Active source per unit (green national, orange city, red none)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def summary_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, value, verdict) rows for the summary table."""
    c = r["checker"]
    inv = r.get("invariants", {})
    rows: list[tuple[str, str, str]] = []
    if "acknowledged" in c:
        rows.append(("acknowledged dossiers / steps", f"{c['acknowledged']} / {c.get('acknowledged_steps')}", ""))
    # A live drill checks fewer figures than a simulated one: show each invariant the run holds itself to.
    labels = {"lost": "lost", "duplicated": "duplicated", "unexpected": "unexpected",
              "converged": "converged (digests equal everywhere)"}
    for key, holds in inv.items():
        if key == "switched":
            continue
        rows.append((labels.get(key, key), _fmt(c.get(key, holds)), "ok" if holds else "VIOLATED"))
    if "in_doubt" in c:
        rows.append(("in doubt (sent, never answered)", str(c["in_doubt"]), ""))
    if "summary_head" in r:  # a live fleet's checker measures other figures: the drill names its own first rows
        rows = [(str(a), str(b), str(v)) for a, b, v in r["summary_head"]]
    for p in c.get("failover", {}).get("phases", []):
        verdict = ""
        if "switched" in inv:
            verdict = "ok" if p["switched"] == p["units"] else "VIOLATED"
        rows.append((f"{p['label']}: switched", f"{p['switched']}/{p['units']}", verdict))
        rows.append((f"{p['label']}: detect p50/p99/max s",
                     "/".join(_fmt(p["detect_s"][k]) for k in ("p50", "p99", "max")), ""))
        rows.append((f"{p['label']}: switch p50/p99/max s",
                     "/".join(_fmt(p["switch_s"][k]) for k in ("p50", "p99", "max")), ""))
    for target, lag in c.get("lag", {}).items():
        rows.append((f"lag {target} p50/p99/max s", "/".join(_fmt(lag["seconds"][k]) for k in ("p50", "p99", "max")),
                     ""))
        rows.append((f"backlog {target}: peak / drained in s", f"{lag['peak_backlog']} / {_fmt(lag['drain_s'])}", ""))
    t = r.get("timings", {})
    rows.append(("day / drain / total (s)", f"{_fmt(t.get('day_s'))} / {_fmt(_drain(t.get('drain_s')))} / "
                 f"{_fmt(t.get('total_s'))}", ""))
    return rows


def _md_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(x).replace("|", "/") for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class='{'bad' if _fmt(x) == 'VIOLATED' else ''}'>{html.escape(_fmt(x))}</td>"
                         for x in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(r: dict[str, Any], out: Path, baseline: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write the report files into ``out``; returns them by kind."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html",
             "lag": out / "lag.png", "timeline": out / "timeline.png", "backlog": out / "backlog.png"}
    files["json"].write_text(json.dumps(r, indent=1, ensure_ascii=False), encoding="utf-8")
    plot_lag(r, files["lag"])
    plot_backlog(r, files["backlog"])
    plot_timeline(r, files["timeline"])
    verdict = "PASSED: every invariant holds" if r.get("ok") else "FAILED: an invariant is violated"
    meta = [
        ("scenario", r.get("scenario")),
        ("seed", r.get("seed")),
        ("software version", r.get("version")),
        ("git commit", r.get("commit")),
        ("nodes", r.get("nodes")),
        ("mode", r.get("mode", "simulated fleet")),
        ("time compression", f"x{r.get('factor')} ({r.get('simulated_hours')} simulated hours)"
         if r.get("factor") else "-"),
        ("workload", ", ".join(f"{k} {v}" for k, v in r.get("workload", {}).items())),
        ("peak RSS of the process tree (MB)", r.get("peak_tree_rss_mb")),
    ]
    phases = [(p.get("at_s"), p.get("until_s"), p.get("kind"), p.get("label"),
               len(p["units"]) if p.get("units") else "all") for p in r.get("phases", [])]
    summary = summary_rows(r)
    base_rows = deltas(r, baseline) if baseline else []
    ex = r["checker"].get("examples", {})
    md = [f"# Failover drill: {r.get('scenario')}", "", f"**{verdict}**", "", r.get("description", ""), "",
          _md_table(("", ""), meta), "", "## Summary", "", _md_table(("figure", "value", "invariant"), summary), ""]
    if base_rows:
        md += ["## Against the baseline", "", _md_table(("figure", "baseline", "now", "change"), base_rows), ""]
    md += ["## Phases", "", _md_table(("at s", "until s", "action", "what", "units"), phases), "",
           "## Plots", "", "![lag](lag.png)", "", "![timeline](timeline.png)", "", "![backlog](backlog.png)", ""]
    if any(ex.values()):
        md += ["## Examples of violations", "", "```json", json.dumps(ex, indent=1, ensure_ascii=False), "```", ""]
    md += ["## Scenario", "", "```toml", r.get("scenario_toml", "").rstrip(), "```", ""]
    files["md"].write_text("\n".join(md), encoding="utf-8")
    css = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#212529}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #dee2e6;padding:3px 8px;"
           "text-align:left}td.bad{color:#c92a2a;font-weight:bold}.ok{color:#2b8a3e}.fail{color:#c92a2a}"
           "pre{background:#f1f3f5;padding:1em;overflow:auto}img{max-width:100%}")
    title = html.escape(str(r.get('scenario')))
    h = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Drill {title}"
         f"</title><style>{css}</style></head><body>",
         f"<h1>Failover drill: {html.escape(str(r.get('scenario')))}</h1>",
         f"<p class='{'ok' if r.get('ok') else 'fail'}'><strong>{verdict}</strong></p>",
         f"<p>{html.escape(r.get('description', ''))}</p>", _html_table(("", ""), meta),
         "<h2>Summary</h2>", _html_table(("figure", "value", "invariant"), summary)]
    if base_rows:
        h += ["<h2>Against the baseline</h2>", _html_table(("figure", "baseline", "now", "change"), base_rows)]
    h += ["<h2>Phases</h2>", _html_table(("at s", "until s", "action", "what", "units"), phases),
          "<h2>Plots</h2>", "<img src='lag.png' alt='lag'>", "<img src='timeline.png' alt='timeline'>",
          "<img src='backlog.png' alt='backlog'>"]
    if any(ex.values()):
        h += ["<h2>Examples of violations</h2>",
              f"<pre>{html.escape(json.dumps(ex, indent=1, ensure_ascii=False))}</pre>"]
    h += ["<h2>Scenario</h2>", f"<pre>{html.escape(r.get('scenario_toml', ''))}</pre>", "</body></html>"]
    files["html"].write_text("\n".join(h), encoding="utf-8")
    return files
