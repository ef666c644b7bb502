"""deploy/: the alert rules pass promtool (check and unit tests), the scrape example is valid, and every
metric the rules and the Grafana dashboard use is one a real node exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.config import load_config
from tests.conftest import AGENCY, UNIT, running_node
from tests.upstreams import running_upstreams, target_overrides

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "wardsync-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "wardsync-dashboard.json"
_METRIC = re.compile(r"\bwardsync_[a-z_]+\b")
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing on CI: install Debian's prometheus package (scripts/test.sh does)")
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=PROM, capture_output=True, text=True, timeout=60)


def base_name(sample: str) -> str:
    for suffix in _SUFFIXES:
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    return exprs


class TestPromtool:
    """The rules are valid, fire when they should (promtool's own unit tests), and the example config loads."""

    def test_check_rules(self) -> None:
        proc = run("check", "rules", RULES.name)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "SUCCESS" in proc.stdout

    def test_rule_unit_tests(self) -> None:
        proc = run("test", "rules", "wardsync-alerts.test.yml")
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def test_check_scrape_config(self) -> None:
        proc = run("check", "config", "prometheus.yml")
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def test_the_required_alerts_exist(self) -> None:
        text = RULES.read_text(encoding="utf-8")
        names = set(re.findall(r"alert: (\w+)", text))
        required = {
            "WardsyncReplicationLagHigh",
            "WardsyncBreakerOpen",
            "WardsyncOffline",
            "WardsyncDeadLetters",
            "WardsyncClockSkew",
            "WardsyncDiskFilling",
        }
        assert required <= names


class TestDashboard:
    """The Grafana dashboard is importable JSON over the node's metrics."""

    def test_shape(self) -> None:
        doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids))
        assert doc["uid"] and doc["title"]
        for p in doc["panels"]:
            if p["type"] != "row":
                assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
                assert p["datasource"]["uid"] == "${datasource}"


class TestNamesExist:
    """No rule or panel watches a metric that does not exist: names are checked against a real scrape."""

    async def test_against_a_running_node(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path) as ups:
            overrides: dict[str, Any] = {
                "node": {"unit": UNIT, "agency_code": AGENCY, "listen": "127.0.0.1:0", "data_dir": str(tmp_path / "n")},
                **target_overrides(ups),
            }
            async with (
                running_node(load_config(env={}, overrides=overrides)) as (_node, url, s),
                s.get(f"{url}/metrics") as r,
            ):
                assert r.status == 200
                text = await r.text()
        exported = {base_name(s.name) for f in text_string_to_metric_families(text) for s in f.samples}
        used = {base_name(m) for m in _METRIC.findall(RULES.read_text(encoding="utf-8"))}
        used |= {base_name(m) for e in dashboard_exprs() for m in _METRIC.findall(e)}
        assert used, "no wardsync metric found in the rules or the dashboard"
        assert used - exported == set()
