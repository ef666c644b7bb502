"""The fleet: an inventory of nodes (TOML) and the fleet dashboard that watches them all.

Inventory format, one ``[[unit]]`` table per node::

    [[unit]]
    unit = "26743"                       # 5-digit unit code from the registry
    url = "http://127.0.0.1:8080"        # the node's base URL
    token = "..."                        # bearer token, or instead:
    # token_env = "WARDSYNC_TOKEN_26743" # name of an environment variable holding it
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from node.registry import get_unit

_KEYS = frozenset({"unit", "url", "token", "token_env"})


class InventoryError(ValueError):
    """An inventory that cannot be used; ``problems`` lists every bad entry, each with its index."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        super().__init__(f"invalid fleet inventory {path}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class FleetNode:
    """One unit's node as the fleet sees it."""

    unit: str
    name: str
    url: str
    token: str

    def __repr__(self) -> str:
        # Never print a bearer token into a log or a traceback.
        return f"FleetNode(unit={self.unit!r}, name={self.name!r}, url={self.url!r}, token='***')"


def _check_url(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return f"url: {url!r} is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"url: {url!r} must be an http:// or https:// URL with a host"
    if parts.query or parts.fragment:
        return f"url: {url!r} must be a base URL without query or fragment"
    return None


def parse_inventory(data: Mapping[str, Any], *, path: str | Path = "<inventory>",
                    env: Mapping[str, str] | None = None) -> list[FleetNode]:
    """The nodes of an already parsed inventory; raises ``InventoryError`` listing every problem."""
    environ = os.environ if env is None else env
    problems: list[str] = []
    for key in data:
        if key != "unit":
            problems.append(f"{key}: unknown top-level key (write one [[unit]] table per node)")
    entries = data.get("unit", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InventoryError(path, [*problems, "unit: must be an array of tables ([[unit]])"])
    if not entries:
        problems.append("no [[unit]] entries")
    nodes: list[FleetNode] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"unit[{i}]"
        bad: list[str] = [f"{k}: unknown key (known: {', '.join(sorted(_KEYS))})" for k in entry if k not in _KEYS]
        code = entry.get("unit")
        unit = get_unit(code) if isinstance(code, str) else None
        if code is None:
            bad.append("unit: required")
        elif unit is None:
            bad.append(f"unit: {code!r} is not one of Ho Chi Minh City's 168 commune-level units")
        elif code in seen:
            bad.append(f"unit: {code} is already listed at unit[{seen[code]}]")
        else:
            seen[code] = i
        url = entry.get("url")
        if url is None:
            bad.append("url: required")
        elif not isinstance(url, str):
            bad.append("url: must be a string")
        elif (msg := _check_url(url)) is not None:
            bad.append(msg)
        token, token_env = entry.get("token"), entry.get("token_env")
        if token is not None and token_env is not None:
            bad.append("token, token_env: give one of them, not both")
        elif token is None and token_env is None:
            bad.append("token: required (or token_env naming an environment variable that holds it)")
        elif token is not None and (not isinstance(token, str) or not token.strip()):
            bad.append("token: must be a non-empty string")
        elif token_env is not None:
            if not isinstance(token_env, str) or not token_env:
                bad.append("token_env: must be the name of an environment variable")
            elif not environ.get(token_env, "").strip():
                bad.append(f"token_env: environment variable {token_env} is not set or empty")
            else:
                token = environ[token_env].strip()
        if bad:
            problems += [f"{where} ({code}): {b}" if isinstance(code, str) else f"{where}: {b}" for b in bad]
            continue
        assert unit is not None and isinstance(url, str) and isinstance(token, str)
        nodes.append(FleetNode(unit=unit.code, name=unit.name, url=url.rstrip("/"), token=token.strip()))
    if problems:
        raise InventoryError(path, problems)
    return nodes


def load_inventory(path: str | Path, *, env: Mapping[str, str] | None = None) -> list[FleetNode]:
    """Read a fleet inventory file; raises ``InventoryError`` (a ``ValueError``) listing every problem."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InventoryError(p, ["file not found"]) from exc
    except OSError as exc:
        raise InventoryError(p, [f"cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise InventoryError(p, ["not UTF-8 text"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(p, [f"not valid TOML: {exc}"]) from exc
    return parse_inventory(data, path=p, env=env)
