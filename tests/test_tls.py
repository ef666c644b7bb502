"""TLS: the node serves HTTPS; upstream certificates are verified against the configured CA bundle."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from adapters.base import UpstreamError
from adapters.national import NationalAdapter
from node.app import serve
from node.config import DEMO_PASSWORD, DEMO_USERNAME, ConfigError, load_config
from node.tls import client_context
from simulations import national_portal
from tests.conftest import AGENCY, UNIT, make_config, running_node, valid_intake


@dataclass
class Pki:
    ca: Path  # the CA that signed the server certificate
    rogue_ca: Path  # a CA that signed nothing here
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, a server certificate it signed for 127.0.0.1, and an unrelated CA."""
    base = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _ca("wardsync test CA")
    _, rogue = _ca("someone else's CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(base / "ca.pem", base / "rogue-ca.pem", base / "server.pem", base / "server-key.pem")
    pki.ca.write_bytes(_pem(ca_cert))
    pki.rogue_ca.write_bytes(_pem(rogue))
    pki.cert.write_bytes(_pem(cert))
    pki.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pki.key.chmod(0o600)
    return pki


def server_ssl(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.cert, pki.key)
    return ctx


@contextlib.asynccontextmanager
async def https_portal(base: Path, pki: Pki) -> AsyncIterator[str]:
    """The national portal stand-in, served over HTTPS with the test CA's certificate."""
    runner = web.AppRunner(national_portal.build_app(base), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl(pki))
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def national(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "url": url,
        "username": DEMO_USERNAME,
        "password": DEMO_PASSWORD,
        "dstcode": AGENCY,
        "madonvi": AGENCY,
        "timeout_s": 2.0,
        **extra,
    }


def node_config(tmp_path: Path, targets: dict[str, Any]) -> Any:
    node = {"unit": UNIT, "agency_code": AGENCY, "listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data")}
    return load_config(env={}, overrides={"node": node, **targets})


class TestServer:
    """With tls_cert and tls_key the node answers HTTPS only."""

    async def test_node_serves_https(self, tmp_path: Path, pki: Pki) -> None:
        config = make_config(tmp_path, tls_cert=str(pki.cert), tls_key=str(pki.key))
        stop, up = asyncio.Event(), asyncio.Event()
        lines: list[str] = []

        def announce(line: str) -> None:
            lines.append(line)
            up.set()

        task = asyncio.create_task(serve(config, stop=stop, announce=announce))
        try:
            async with asyncio.timeout(20):
                await up.wait()
            url = lines[0].rsplit(" ", 1)[1]
            assert url.startswith("https://127.0.0.1:")
            trusted = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=pki.ca))
            async with aiohttp.ClientSession(connector=trusted) as s, s.get(f"{url}/livez") as r:
                assert r.status == 200
            async with aiohttp.ClientSession() as s:
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await s.get(f"{url}/livez")
                with pytest.raises(aiohttp.ClientError):
                    await s.get(url.replace("https://", "http://") + "/livez")
        finally:
            stop.set()
            await task

    def test_cert_without_key_and_an_exposed_key_are_refused(self, tmp_path: Path, pki: Pki) -> None:
        with pytest.raises(ConfigError, match="give both"):
            make_config(tmp_path, tls_cert=str(pki.cert))
        exposed = tmp_path / "key.pem"
        exposed.write_bytes(pki.key.read_bytes())
        exposed.chmod(0o644)
        with pytest.raises(ConfigError, match="chmod 600"):
            make_config(tmp_path, tls_cert=str(pki.cert), tls_key=str(exposed))


class TestUpstream:
    """Upstream certificates are checked against ca_bundle; an untrusted one is refused."""

    async def test_untrusted_certificate_is_refused_and_the_right_bundle_works(self, tmp_path: Path, pki: Pki) -> None:
        async with https_portal(tmp_path / "portal", pki) as url:
            for bundle, ok in ((None, False), (pki.rogue_ca, False), (pki.ca, True)):
                config = node_config(tmp_path, {"targets.national": national(url, ca_bundle=str(bundle or ""))})
                assert config.national is not None
                connector = aiohttp.TCPConnector(ssl=client_context(config.national))
                async with aiohttp.ClientSession(connector=connector) as session:
                    adapter = NationalAdapter(
                        url,
                        username=DEMO_USERNAME,
                        password=DEMO_PASSWORD,
                        dstcode=AGENCY,
                        madonvi=AGENCY,
                        session=session,
                        timeout_s=2.0,
                    )
                    if ok:
                        await adapter.probe()
                    else:
                        with pytest.raises(UpstreamError, match=r"(?i)certificate"):
                            await adapter.probe()

    async def test_node_replicates_over_verified_https(self, tmp_path: Path, pki: Pki) -> None:
        """A node with the right ca_bundle pushes to the HTTPS portal; status shows verification on."""
        async with https_portal(tmp_path / "portal", pki) as url:
            config = node_config(tmp_path, {"targets.national": national(url, ca_bundle=str(pki.ca))})
            async with running_node(config) as (_, base, session):
                async with session.post(f"{base}/api/v1/dossiers", json=valid_intake()) as r:
                    code = (await r.json())["MaHoSo"]
                trusted = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=pki.ca))
                async with aiohttp.ClientSession(connector=trusted) as portal:
                    for _ in range(100):  # bounded: the push loop runs on its own tick
                        async with portal.get(f"{url}/__inspect/dossiers", params={"unit": UNIT}) as r:
                            held = {d["code"] for d in await r.json()}
                        if code in held:
                            break
                        await asyncio.sleep(0.1)
                assert code in held
                async with session.get(f"{base}/api/v1/status") as r:
                    status = await r.json()
        assert status["targets"]["national"]["tls"] == {"https": True, "verify": True, "ca_bundle": str(pki.ca)}

    async def test_verification_off_is_never_silent(self, tmp_path: Path, pki: Pki) -> None:
        """tls_verify = false logs a warning at start and shows in /api/v1/status."""
        async with https_portal(tmp_path / "portal", pki) as url:
            config = node_config(tmp_path, {"targets.national": national(url, tls_verify="false")})
            with capture_logs() as logs:
                async with running_node(config) as (_, base, session), session.get(f"{base}/api/v1/status") as r:
                    status = await r.json()
        warnings = [e for e in logs if e["event"] == "tls_verification_off"]
        assert warnings and warnings[0]["log_level"] == "warning" and warnings[0]["target"] == "national"
        assert status["targets"]["national"]["tls"]["verify"] is False
