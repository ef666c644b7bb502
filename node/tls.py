"""TLS for the node's own API and for its calls to the upstreams.

The node serves HTTPS when ``[node] tls_cert`` and ``tls_key`` name a PEM certificate (chain) and key.
Upstream certificates are verified against ``[targets.<name>] ca_bundle`` (a PEM file) or, when that is
empty, the system's trust store. ``tls_verify = false`` turns verification off for one target: it exists
for a drill against a stand-in with a throwaway certificate, is logged as a warning at every start and
shows in ``/api/v1/status``, so it can never be left on unnoticed.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from node.secretfile import mode_problem

if TYPE_CHECKING:
    from node.config import Config

log = structlog.get_logger()


def server_context(config: Config) -> ssl.SSLContext | None:
    """The SSL context of the node's listener, or None for plain HTTP."""
    node = config.node
    if not node.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(node.tls_cert, node.tls_key)
    return ctx


def client_context(target: Any) -> ssl.SSLContext:
    """The SSL context for calls to one upstream: its CA bundle, or the system's trust store."""
    ctx = ssl.create_default_context(cafile=target.ca_bundle or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not target.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def describe(config: Config, name: str) -> dict[str, Any] | None:
    """How calls to target ``name`` are protected, for /api/v1/status."""
    target = getattr(config, name, None)
    if target is None:
        return None
    https = str(target.url).startswith("https://")
    return {
        "https": https,
        "verify": bool(target.tls_verify) if https else None,
        "ca_bundle": (target.ca_bundle or "system") if https else None,
    }


def warn_unverified(config: Config) -> list[str]:
    """Log a warning for every target whose certificate is not verified; returns their names."""
    names = [n for n in ("national", "city") if (t := getattr(config, n)) is not None and not t.tls_verify]
    for name in names:
        log.warning(
            "tls_verification_off",
            target=name,
            reason=f"[targets.{name}] tls_verify = false: the upstream's certificate is not checked; "
            "anyone on the path can read the credentials and the dossiers",
        )
    return names


def config_problems(config: Config) -> list[str]:
    """Every TLS problem in a configuration, one line each."""
    problems: list[str] = []
    node = config.node
    if bool(node.tls_cert) != bool(node.tls_key):
        problems.append("[node] tls_cert and tls_key: give both (PEM certificate and key) or neither")
    elif node.tls_cert:
        for key, value in (("tls_cert", node.tls_cert), ("tls_key", node.tls_key)):
            if not Path(value).is_file():
                problems.append(f"[node] {key}: {value!r} is not a file")
        if not problems:
            if exposed := mode_problem(Path(node.tls_key), "the TLS private key"):
                problems.append(f"[node] tls_key: {exposed}")
            try:
                server_context(config)
            except (ssl.SSLError, OSError) as exc:
                problems.append(f"[node] tls_cert/tls_key: cannot be loaded as a certificate and its key: {exc}")
    for name in ("national", "city"):
        target = getattr(config, name)
        if target is None or not target.ca_bundle:
            continue
        if not Path(target.ca_bundle).is_file():
            problems.append(f"[targets.{name}] ca_bundle: {target.ca_bundle!r} is not a file")
            continue
        try:
            ssl.create_default_context(cafile=target.ca_bundle)
        except (ssl.SSLError, OSError) as exc:
            problems.append(f"[targets.{name}] ca_bundle: not a PEM CA bundle: {exc}")
    return problems
