"""``wardsync doctor`` against deliberately broken setups, run as the operator runs it: a process.

The upstream stand-ins run on loopback; each test breaks one thing (the upstream's clock, the disk, a
password, the data directory's mode, a certificate) and checks that doctor names it, says how to fix it
and exits non-zero, and that a healthy setup passes with exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from node.app import serve
from node.config import DEMO_CLIENT_SECRET, DEMO_PASSWORD
from simulations import national_portal
from tests.conftest import UNIT, provision_token, valid_intake
from tests.opshelp import cli, load, write_config
from tests.upstreams import Upstreams, running_upstreams

Result = tuple[int, dict[str, dict[str, str]]]


async def doctor(config: Path, *extra: str) -> Result:
    """Run ``wardsync doctor --json``; (exit status, checks by name)."""
    done = await asyncio.to_thread(cli, "doctor", "--config", str(config), "--json", "--timeout", "3", *extra,
                                   cwd=config.parent)
    assert done.returncode in (0, 1), done.stderr
    checks = json.loads(done.stdout)
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in checks), checks
    assert all(c["fix"] for c in checks if c["status"] != "ok"), "every warning and failure says what to do"
    return done.returncode, {c["name"]: c for c in checks}


def statuses(checks: dict[str, dict[str, str]]) -> dict[str, str]:
    return {name: c["status"] for name, c in checks.items()}


@contextlib.asynccontextmanager
async def serving(config: Path) -> AsyncIterator[str]:
    """The node of ``config`` served in this process; yields its base URL."""
    stop, up = asyncio.Event(), asyncio.Event()
    lines: list[str] = []

    def announce(line: str) -> None:
        lines.append(line)
        up.set()

    task = asyncio.create_task(serve(load(config), stop=stop, announce=announce))
    try:
        async with asyncio.timeout(20):
            await up.wait()
        yield lines[0].rsplit(" ", 1)[1]
    finally:
        stop.set()
        await task


async def accept_and_sync(config: Path, base: str, ups: Upstreams) -> None:
    token = await asyncio.to_thread(provision_token, config)
    async with (aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s,
                s.post(f"{base}/api/v1/dossiers", json=valid_intake()) as r):
        assert r.status == 201, await r.text()
        code = (await r.json())["MaHoSo"]
    for _ in range(200):
        if code in await ups.dossiers("national", UNIT) and code in await ups.dossiers("city", UNIT):
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"{code} did not reach both upstreams")


def healthy_dir(root: Path) -> Path:
    """The data directory as the install instructions make it: closed to other users."""
    data = root / "data"
    data.mkdir(mode=0o750)
    data.chmod(0o750)
    return data


class TestHealthy:
    """A node in good order: every check ok, exit 0, in JSON and as a table."""

    async def test_all_ok_exits_zero(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path / "ups") as ups:
            healthy_dir(tmp_path)
            config = write_config(tmp_path, ups)
            async with serving(config) as base:
                await accept_and_sync(config, base, ups)
                # This machine's free space is not what is tested here: a threshold it clears.
                rc, checks = await doctor(config, "--min-free-mb", "1", "--min-free-inodes", "1")
                table = await asyncio.to_thread(cli, "doctor", "--config", str(config), "--min-free-mb", "1",
                                                "--min-free-inodes", "1", cwd=tmp_path)
        assert statuses(checks) == {
            "node": "ok", "data directory": "ok", "disk space": "ok", "inodes": "ok", "store": "ok", "schema": "ok",
            "national": "ok", "clock vs national": "ok", "city": "ok", "clock vs city": "ok",
            "certificate (national)": "ok", "certificate (city)": "ok", "lag national": "ok", "lag city": "ok",
        }, checks
        assert rc == 0
        assert "wardsync serve" in checks["node"]["detail"]
        assert checks["lag national"]["detail"] == "0 changes waiting"
        assert table.returncode == 0, table.stderr
        assert "wardsync doctor" in table.stdout and "0 failure(s), 0 warning(s)" in table.stdout
        for name in checks:
            assert name in table.stdout


class TestClock:
    """An upstream whose Date header is off: a warning past 5 s, a failure past a minute, naming the offset."""

    async def test_skewed_upstream_clocks(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path / "ups") as ups:
            config = write_config(tmp_path, ups)
            await ups.fault("national", mode="clock_skew", offset_s=-90)
            await ups.fault("city", mode="clock_skew", offset_s=20)
            rc, checks = await doctor(config, "--min-free-mb", "1")
        national, city = checks["clock vs national"], checks["clock vs city"]
        assert national["status"] == "failure", national
        m = re.fullmatch(r"this server is (\d+\.\d) s ahead of national", national["detail"])
        assert m and 88 <= float(m.group(1)) <= 92, national
        assert "timedatectl set-ntp true" in national["fix"]
        assert city["status"] == "warning", city
        m = re.fullmatch(r"this server is (\d+\.\d) s behind city", city["detail"])
        assert m and 18 <= float(m.group(1)) <= 22, city
        assert rc == 1

    async def test_upstream_ahead_is_told_as_behind(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path / "ups") as ups:
            config = write_config(tmp_path, ups)
            await ups.fault("national", mode="clock_skew", offset_s=300)
            rc, checks = await doctor(config, "--min-free-mb", "1")
        m = re.fullmatch(r"this server is (\d+\.\d) s behind national", checks["clock vs national"]["detail"])
        assert m and 298 <= float(m.group(1)) <= 302, checks["clock vs national"]
        assert checks["clock vs national"]["status"] == "failure"
        assert checks["clock vs city"]["status"] == "ok", checks["clock vs city"]
        assert rc == 1


class TestDisk:
    """Too little free space or too few inodes under the data directory: a failure."""

    async def test_free_space_below_the_minimum(self, tmp_path: Path) -> None:
        config = write_config(tmp_path)
        st = os.statvfs(tmp_path)
        above = st.f_bavail * st.f_frsize / 2**20 + 1000
        rc, checks = await doctor(config, "--min-free-mb", f"{above:.0f}")
        disk = checks["disk space"]
        assert disk["status"] == "failure", disk
        assert f"below the {above:,.0f} MB minimum" in disk["detail"]
        assert "free space on the filesystem" in disk["fix"]
        assert rc == 1
        rc, checks = await doctor(config, "--min-free-mb", f"{above / 2:.0f}")  # under 4x the minimum
        assert checks["disk space"]["status"] == "warning", checks["disk space"]

    async def test_a_full_small_filesystem(self, tmp_path: Path, small_fs: Path) -> None:
        """A 1 MB tmpfs with 100 inodes, filled up: both disk checks fail with the default thresholds."""
        data = small_fs / "data"
        data.mkdir(mode=0o750)
        with contextlib.suppress(OSError), (data / "filler").open("wb") as f:
            while True:  # until ENOSPC
                f.write(b"\0" * 65536)
                f.flush()
        config = write_config(tmp_path, data_dir=data)
        rc, checks = await doctor(config)
        assert checks["disk space"]["status"] == "failure", checks["disk space"]
        assert checks["disk space"]["detail"].startswith("0 MB free"), checks["disk space"]
        assert checks["inodes"]["status"] == "failure", checks["inodes"]
        assert "inodes free, below 10,000" in checks["inodes"]["detail"]
        assert rc == 1


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tiny tmpfs mounted for the test (needs root); skipped where mounting is not allowed."""
    where = tmp_path / "small"
    where.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=100,mode=0755", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False, timeout=30)


class TestCredentials:
    """A wrong password or client secret: a failure naming the upstream, the setting and the reload."""

    async def test_wrong_password_and_wrong_secret(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path / "ups") as ups:
            config = write_config(tmp_path, ups, replace={
                f'password = "{DEMO_PASSWORD}"': 'password = "not-the-password"',
                f'client_secret = "{DEMO_CLIENT_SECRET}"': 'client_secret = "not-the-secret"',
            })
            rc, checks = await doctor(config, "--min-free-mb", "1")
            table = await asyncio.to_thread(cli, "doctor", "--config", str(config), "--min-free-mb", "1",
                                            cwd=tmp_path)
        national, city = checks["national"], checks["city"]
        assert national["status"] == "failure" and "credentials refused" in national["detail"], national
        assert "[targets.national] username/password" in national["fix"], national
        assert "systemctl reload wardsync" in national["fix"]
        assert city["status"] == "failure" and "credentials refused" in city["detail"], city
        assert "[targets.city] client_id/client_secret" in city["fix"], city
        assert "not-the-password" not in json.dumps(checks) and "not-the-secret" not in json.dumps(checks)
        # The table shows the section names in brackets as they are, not eaten as markup.
        assert table.returncode == 1
        assert "[targets.national]" in table.stdout and "[targets.city]" in table.stdout, table.stdout
        failed = sum(c["status"] == "failure" for c in checks.values())
        warned = sum(c["status"] == "warning" for c in checks.values())
        assert f"{failed} failure(s), {warned} warning(s)" in table.stdout
        # The clock is still measured: a refused login is no reason to hide another problem.
        assert checks["clock vs national"]["status"] == "ok", checks["clock vs national"]
        assert rc == 1

    async def test_unreachable_upstream(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path / "ups") as ups:
            config = write_config(tmp_path, ups)
            await ups.fault("city", mode="down")
            rc, checks = await doctor(config, "--min-free-mb", "1")
        assert checks["national"]["status"] == "ok", checks["national"]
        assert checks["city"]["status"] == "failure", checks["city"]
        assert rc == 1


NOBODY = 65534  # nobody:nogroup, an account other than the one that made the files


def wardsync() -> list[str]:
    exe = Path(sys.executable).parent / "wardsync"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "node"]


def as_nobody(*cmd: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WARDSYNC_")}
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=env, check=False,
    )


class TestDataDirectory:
    """A data directory other users may write is a failure; one they may read, a warning."""

    async def test_world_writable_and_world_readable(self, tmp_path: Path) -> None:
        data = healthy_dir(tmp_path)
        config = write_config(tmp_path)
        await asyncio.to_thread(provision_token, config)  # creates the store
        rc, checks = await doctor(config, "--min-free-mb", "1")
        assert checks["data directory"]["status"] == "ok", checks["data directory"]
        assert rc == 0, checks

        data.chmod(0o777)
        rc, checks = await doctor(config, "--min-free-mb", "1")
        check = checks["data directory"]
        assert check["status"] == "failure" and "writable by every user" in check["detail"], check
        assert "777" in check["detail"] and check["fix"] == f"chmod -R o-rwx {data}"
        assert rc == 1

        data.chmod(0o755)  # a plain mkdir under umask 022, with the store as SQLite makes it under that umask
        (data / "wardsync.sqlite3").chmod(0o644)
        rc, checks = await doctor(config, "--min-free-mb", "1")
        check = checks["data directory"]
        assert check["status"] == "warning" and "open to all users" in check["detail"], check
        assert f"{data / 'wardsync.sqlite3'} (mode 644)" in check["detail"], check
        assert rc == 0

        (data / "wardsync.sqlite3").chmod(0o666)
        data.chmod(0o750)  # closed again: files inside cannot be reached, whatever their mode
        rc, checks = await doctor(config, "--min-free-mb", "1")
        assert checks["data directory"]["status"] == "ok", checks["data directory"]
        data.chmod(0o751)  # others may enter by name: the writable store file is a failure
        rc, checks = await doctor(config, "--min-free-mb", "1")
        check = checks["data directory"]
        assert check["status"] == "failure" and "wardsync.sqlite3 (mode 666)" in check["detail"], check

    def test_run_as_another_user_reports_rather_than_crashes(self) -> None:
        """Run by an account that cannot enter the data directory (root's, not the service's), doctor
        names the checks it could not make and how to run it; run by the owner, the directory is ok."""
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("needs root and setpriv to act as another user")
        import node

        base = Path(tempfile.mkdtemp(prefix="wardsync-doctor-"))  # pytest's own directories are root-only
        try:
            base.chmod(0o755)
            probe = as_nobody("test", "-r", str(Path(node.__file__)), cwd=base)
            if probe.returncode != 0:
                pytest.skip(f"the program is not readable by uid {NOBODY} here")
            data = healthy_dir(base)
            config = write_config(base)  # no upstreams, so no secrets in it: readable by all
            config.chmod(0o644)
            provision_token(config)

            done = as_nobody(*wardsync(), "doctor", "--config", str(config), "--json", cwd=base)
            assert done.returncode == 1, done.stdout + done.stderr
            assert "Traceback" not in done.stderr, done.stderr
            checks = {c["name"]: c for c in json.loads(done.stdout)}
            assert checks["data directory"]["status"] == "failure", checks
            assert "not writable by this user" in checks["data directory"]["detail"]
            for name in ("node", "store"):
                assert checks[name]["status"] == "warning", checks[name]
                assert checks[name]["detail"].startswith("not checked: permission denied"), checks[name]
                assert "runuser -u wardsync" in checks[name]["fix"], checks[name]

            for p in (data, *data.iterdir()):
                os.chown(p, NOBODY, NOBODY)
            done = as_nobody(*wardsync(), "doctor", "--config", str(config), "--json", "--min-free-mb", "1",
                             cwd=base)
            checks = {c["name"]: c for c in json.loads(done.stdout)}
            assert checks["data directory"]["status"] == "ok", checks["data directory"]
            assert checks["store"]["status"] == "ok", checks["store"]
            assert done.returncode == 0, done.stdout + done.stderr
        finally:
            shutil.rmtree(base, ignore_errors=True)

    async def test_damaged_store(self, tmp_path: Path) -> None:
        healthy_dir(tmp_path)
        config = write_config(tmp_path)
        await asyncio.to_thread(provision_token, config)
        db = tmp_path / "data" / "wardsync.sqlite3"
        for name in ("wardsync.sqlite3-wal", "wardsync.sqlite3-shm"):
            (tmp_path / "data" / name).unlink(missing_ok=True)
        raw = bytearray(db.read_bytes())
        page = 4096
        for at in range(2 * page, len(raw), page):  # every page past the first two: tables and indexes
            raw[at : at + 64] = b"\xff" * 64
        db.write_bytes(bytes(raw))
        rc, checks = await doctor(config, "--min-free-mb", "1")
        assert checks["store"]["status"] == "failure", checks["store"]
        assert "wardsync restore" in checks["store"]["fix"]
        assert rc == 1


# --- certificates ------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Pki:
    """A throwaway CA issuing certificates for 127.0.0.1 with chosen validity."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name("doctor test CA")).issuer_name(_name("doctor test CA"))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=400)).not_valid_after(now + dt.timedelta(days=400))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca = where / "ca.pem"
        self.ca.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, days_left: float) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=100)).not_valid_after(now + dt.timedelta(days=days_left))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = self.where / f"{name}.pem", self.where / f"{name}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path


@contextlib.asynccontextmanager
async def https_portal(base: Path, cert: Path, key: Path) -> AsyncIterator[str]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    runner = web.AppRunner(national_portal.build_app(base), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def node_tls(cert: Path, key: Path) -> dict[str, str]:
    return {"shutdown_timeout_s = 30.0": f'shutdown_timeout_s = 30.0\ntls_cert = "{cert}"\ntls_key = "{key}"'}


class TestCertificates:
    """The node's own certificate and the upstreams': a warning within three weeks of expiry, a failure after."""

    async def test_node_certificate_expiring_and_expired(self, tmp_path: Path) -> None:
        pki = Pki(tmp_path)
        cert, key = pki.issue("soon", days_left=10)
        config = write_config(tmp_path, replace=node_tls(cert, key))
        rc, checks = await doctor(config, "--min-free-mb", "1")
        check = checks["certificate (node)"]
        assert check["status"] == "warning", check
        assert re.fullmatch(r"expires on \d{4}-\d\d-\d\d, in (9|10) days", check["detail"]), check
        assert "renew the certificate" in check["fix"] and "systemctl reload wardsync" in check["fix"]

        cert, key = pki.issue("old", days_left=-2)
        config = write_config(tmp_path, replace=node_tls(cert, key))
        rc, checks = await doctor(config, "--min-free-mb", "1")
        check = checks["certificate (node)"]
        assert check["status"] == "failure" and check["detail"].startswith("expired on "), check
        assert rc == 1

        cert, key = pki.issue("fresh", days_left=90)
        config = write_config(tmp_path, replace=node_tls(cert, key))
        rc, checks = await doctor(config, "--min-free-mb", "1")
        assert checks["certificate (node)"]["status"] == "ok", checks["certificate (node)"]

    async def test_upstream_certificate_expiring_and_expired(self, tmp_path: Path) -> None:
        pki = Pki(tmp_path)
        targets = f'ca_bundle = "{pki.ca}"\ntimeout_s = 2.0'

        async def run(days_left: float) -> dict[str, Any]:
            cert, key = pki.issue(f"portal{days_left}", days_left=days_left)
            async with https_portal(tmp_path / f"portal{days_left}", cert, key) as url:
                config = tmp_path / "wardsync.toml"
                text = write_config(tmp_path).read_text(encoding="utf-8")
                text += (f'\n[targets.national]\nurl = "{url}"\nusername = "wardsync"\npassword = "{DEMO_PASSWORD}"\n'
                         f'dstcode = "000.00.17.H29"\nmadonvi = "000.00.17.H29"\n{targets}\n')
                config.write_text(text, encoding="utf-8")
                rc, checks = await doctor(config, "--min-free-mb", "1")
            return {"rc": rc, **checks}

        soon = await run(5)
        check = soon["certificate (national)"]
        assert check["status"] == "warning", check
        assert re.fullmatch(r"expires on \d{4}-\d\d-\d\d, in [45] days", check["detail"]), check
        assert "tell its operator" in check["fix"]
        assert soon["national"]["status"] == "ok", soon["national"]

        expired = await run(-1)
        check = expired["certificate (national)"]
        assert check["status"] == "failure" and "certificate has expired" in check["detail"], check
        # The login never happened: not a credentials problem, and the fix must not send anyone to the password.
        assert expired["national"]["status"] == "failure", expired["national"]
        assert "credentials refused" not in expired["national"]["detail"], expired["national"]
        assert "password" not in expired["national"]["fix"], expired["national"]
        assert "TLS handshake failed" in expired["national"]["detail"], expired["national"]
        assert "ca_bundle" in expired["national"]["fix"], expired["national"]
        assert expired["rc"] == 1
