"""Refuse a configuration file that holds secrets and can be read by anyone but the node.

A file owned by the user the node runs as must be mode 600 (or stricter). A file owned by someone else
(the installed layout: root owns it, the service reads it through its own group) may also be read by its
group, never by others, and never written by anyone but its owner.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SECRET_WORDS = ("password", "secret", "token")


def secret_settings(raw: Any, prefix: str = "") -> Iterator[str]:
    """Dotted names of the non-empty settings in a parsed TOML file whose name says they are secret."""
    if not isinstance(raw, dict):
        return
    for key, value in raw.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from secret_settings(value, name)
        elif value not in ("", None) and any(w in str(key).lower() for w in SECRET_WORDS):
            yield name


def exposure_problem(path: Path, raw: Any) -> str | None:
    """Why ``path`` may not hold the secrets it holds, or None when it may (or holds none)."""
    names = sorted(secret_settings(raw))
    if not names:
        return None
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    allowed = 0o600 if st.st_uid == os.geteuid() else 0o640
    if mode & ~allowed & 0o777:
        return (
            f"{path}: holds secrets ({', '.join(names)}) but its mode {mode:03o} lets other users read or change "
            f"it; run `chmod 600 {path}` (or `chmod 640` with the service's group when root owns it), "
            "or pass the secrets in WARDSYNC_* environment variables instead"
        )
    return None


def mode_problem(path: Path, what: str) -> str | None:
    """Why a file holding a secret (a private key) is too open, or None."""
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    allowed = 0o600 if st.st_uid == os.geteuid() else 0o640
    if mode & ~allowed & 0o777:
        return f"{path} holds {what} but its mode {mode:03o} lets other users read or change it; run `chmod 600 {path}`"
    return None


def secret_values(config: Any) -> list[str]:
    """The credentials a configuration holds, whatever their source (file or environment)."""
    values = [str(getattr(config.node, "peer_token", "") or "")]
    if config.national is not None:
        values.append(config.national.password)
    if config.city is not None:
        values.append(config.city.client_secret)
    return [v for v in values if v]
