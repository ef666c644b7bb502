"""``wardsync demo``: dossiers visibly reach both stand-ins, and Ctrl-C stops everything cleanly."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.test_replication_crash import _free_port


class TestDemo:
    """The newcomer's run command."""

    def test_dossiers_flow_to_both_sides_and_ctrl_c_stops(self, tmp_path: Path) -> None:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("WARDSYNC_")}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node",
                "demo",
                "--listen",
                f"127.0.0.1:{port}",
                "--data-dir",
                str(tmp_path / "demo"),
                "--dossiers",
                "3",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        lines: list[str] = []
        try:
            assert proc.stdout is not None
            sel = selectors.DefaultSelector()  # closed with the process's pipe below
            sel.register(proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                if not sel.select(timeout=1):
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line.rstrip())
                if line.startswith("node 3 · national portal 3 · city system 3"):
                    break
            assert any(f"listening on http://127.0.0.1:{port}" in x for x in lines), lines
            assert sum(x.startswith("accepted ") and "(HTTP 201)" in x for x in lines) == 3, lines
            assert lines[-1].startswith("node 3 · national portal 3 · city system 3"), lines
            # The printed token is what a newcomer pastes: it opens the API, and nothing opens without it.
            (export,) = [x for x in lines if x.strip().startswith("export WARDSYNC_TOKEN=")]
            token = export.split("=", 1)[1]
            status_url = f"http://127.0.0.1:{port}/api/v1/status"
            request = urllib.request.Request(status_url, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert resp.status == 200
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(status_url, timeout=10)
            assert refused.value.code == 401
            refused.value.close()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=15) == 0
            rest = proc.stdout.read()
            assert "Traceback" not in rest, rest
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
