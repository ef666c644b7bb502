"""Node configuration: a TOML file plus ``WARDSYNC_{SECTION}_{KEY}`` environment overrides.

Read once into frozen dataclasses and validated once, with every problem listed in one error.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from node import tls
from node.registry import get_unit, is_agency_code
from node.secretfile import exposure_problem

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_DATA_DIR = "./data"
DEFAULT_MAX_BODY = 256 * 1024
DEFAULT_SQLITE_CACHE_KIB = 2000  # SQLite's default page cache (cache_size = -2000)
DEFAULT_MAX_DOCUMENT = 20 * 1024 * 1024
ENV_PREFIX = "WARDSYNC_"


class ConfigError(Exception):
    """An invalid configuration; ``problems`` lists every one found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class NodeSection:
    unit: str = ""
    agency_code: str = ""
    listen: str = DEFAULT_LISTEN
    data_dir: str = DEFAULT_DATA_DIR
    max_body_bytes: int = DEFAULT_MAX_BODY
    shutdown_timeout_s: float = 30.0
    # Page cache of each of the store's two SQLite connections, in KiB (SQLite's own default is about 2 MB).
    # Several nodes in one process (a drill's fleet) keep their memory bounded with a smaller one.
    sqlite_cache_kib: int = DEFAULT_SQLITE_CACHE_KIB
    # Submitted documents: the largest upload, the URL other systems fetch them from (empty: derived from
    # listen), and the bearer token (role peer) this node shows other units' nodes when it fetches theirs.
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT
    public_url: str = ""
    peer_token: str = ""
    # The other units' nodes this node fetches documents from, as origins separated by commas
    # ("https://unit-26740.example:8443, https://..."): the peer token goes to these and nowhere else.
    peer_urls: str = ""
    # HTTPS: PEM certificate (chain) and key; both or neither. Empty: plain HTTP.
    tls_cert: str = ""
    tls_key: str = ""
    # Where the receipt signing key lives; empty: <data_dir>/keys (see node/receipts.py).
    key_dir: str = ""
    # Keyring that encrypts dossier contents at rest (see node/crypto.py); must lie outside data_dir.
    # Empty: the store is kept in clear (`wardsync init` writes one).
    key_file: str = ""
    # Procedure catalogue (processing times, working calendar) the due dates come from; empty: the shipped one.
    procedure_catalogue: str = ""


@dataclass(frozen=True)
class LogSection:
    level: str = "info"
    format: str = "auto"  # auto: console on a terminal, JSON otherwise


@dataclass(frozen=True)
class NationalTarget:
    """The national portal (DVCQG): session login with username/password and a dstcode header."""

    url: str = ""
    username: str = ""
    password: str = ""
    dstcode: str = ""
    madonvi: str = ""
    timeout_s: float = 10.0
    # PEM CA bundle to verify the portal's certificate with (empty: the system's); see node/tls.py.
    ca_bundle: str = ""
    tls_verify: bool = True


@dataclass(frozen=True)
class CityTarget:
    """The city's own system: OAuth2 client credentials."""

    url: str = ""
    client_id: str = ""
    client_secret: str = ""
    timeout_s: float = 10.0
    ca_bundle: str = ""
    tls_verify: bool = True


@dataclass(frozen=True)
class ReplicationSection:
    batch_size: int = 500
    max_attempts: int = 8
    tick_s: float = 1.0
    # A change wakes the push loops at once; they wait this long first, so a desk's burst goes out as one push.
    push_linger_s: float = 0.05
    seed_timeout_s: float = 5.0
    # Pull the active source's feed this often; the standby's, so a switch never starts cold, this often.
    pull_tick_s: float = 1.0
    standby_pull_s: float = 30.0
    # An active feed that keeps coming back empty is asked less and less often, doubling from pull_tick_s
    # up to this; the first page with anything in it goes back to pull_tick_s.
    pull_idle_max_s: float = 5.0
    # Journal entries acknowledged by every target are pruned after this many hours.
    journal_retention_h: float = 168.0
    # How often the journal is pruned, in seconds.
    prune_tick_s: float = 600.0
    # Anti-entropy compares one bucket of a unit's dossiers per tick, per target: a whole round takes
    # antientropy_buckets x antientropy_tick_s (16 minutes by default).
    antientropy_tick_s: float = 60.0
    antientropy_buckets: int = 16
    # Backoff between failed push calls: full jitter from retry_base_s doubling up to retry_cap_s.
    retry_base_s: float = 0.5
    retry_cap_s: float = 30.0


@dataclass(frozen=True)
class FailoverSection:
    """Health probes, breakers and the active-source choice (see failover/breaker.py for the defaults)."""

    primary: str = "national"
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 2.0
    # A target in good standing that answered any call within this long is not probed (see failover/health.py).
    probe_quiet_s: float = 5.0
    hold_s: float = 60.0
    evaluate_s: float = 0.25
    consecutive_failures: int = 4
    failure_rate: float = 0.5
    window_s: float = 30.0
    min_calls: int = 10
    open_base_s: float = 5.0
    open_cap_s: float = 300.0


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    log: LogSection = field(default_factory=LogSection)
    replication: ReplicationSection = field(default_factory=ReplicationSection)
    failover: FailoverSection = field(default_factory=FailoverSection)
    national: NationalTarget | None = None
    city: CityTarget | None = None
    source: str = "<defaults>"

    @property
    def listen_host(self) -> str:
        return split_listen(self.node.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_listen(self.node.listen)[1]

    @property
    def data_path(self) -> Path:
        return Path(self.node.data_dir)

    @property
    def db_path(self) -> Path:
        return self.data_path / "wardsync.sqlite3"


_SECTIONS: dict[str, type[Any]] = {
    "node": NodeSection,
    "log": LogSection,
    "replication": ReplicationSection,
    "failover": FailoverSection,
    "targets.national": NationalTarget,
    "targets.city": CityTarget,
}
_OPTIONAL = {"targets.national", "targets.city"}


def split_peer_urls(text: str) -> list[str]:
    """The entries of ``[node] peer_urls`` (commas or white space between them)."""
    return [u for u in text.replace(",", " ").split() if u]


def origin_of(url: str) -> str | None:
    """``scheme://host:port`` of an http(s) URL, lower case with the default port made explicit; None if not.

    The path is not part of it: a document link and the peer it points at share one origin.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return None
    port = port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname.lower()}:{port}"


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _coerce(value: Any, target: type[Any], where: str, problems: list[str]) -> Any:
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in {"true", "1", "yes", "false", "0", "no"}:
            return value.strip().lower() in {"true", "1", "yes"}
        problems.append(f"{where}: must be true or false, got {value!r}")
        return None
    if target is int:
        if isinstance(value, bool):
            problems.append(f"{where}: must be an integer")
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            problems.append(f"{where}: must be an integer, got {value!r}")
            return None
    if target is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            problems.append(f"{where}: must be a number, got {value!r}")
            return None
    if not isinstance(value, str):
        problems.append(f"{where}: must be a string, got {value!r}")
        return None
    return value


def _types(cls: type[Any]) -> dict[str, type[Any]]:
    defaults = cls()
    return {f.name: type(getattr(defaults, f.name)) for f in fields(cls)}


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Read, merge (file < environment < explicit overrides) and validate a configuration."""
    env = os.environ if env is None else env
    problems: list[str] = []
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([f"{path}: file not found (create one with `wardsync init`)"]) from None
        except PermissionError as exc:
            raise ConfigError([f"{path}: cannot be read by this user ({exc.strerror})"]) from exc
        except IsADirectoryError as exc:
            raise ConfigError([f"{path}: is a directory, not a configuration file"]) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
        if exposed := exposure_problem(Path(path), raw):
            problems.append(exposed)

    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        types = _types(cls)
        given: Any = raw
        for part in name.split("."):
            given = given.get(part, {}) if isinstance(given, dict) else {}
        present = name in _OPTIONAL and isinstance(raw.get("targets"), dict) and name.split(".")[1] in raw["targets"]
        if not isinstance(given, dict):
            problems.append(f"[{name}]: must be a table")
            given = {}
        values: dict[str, Any] = {}
        for key, value in given.items():
            if key not in types:
                problems.append(f"[{name}] {key}: unknown setting (known: {', '.join(sorted(types))})")
                continue
            values[key] = _coerce(value, types[key], f"[{name}] {key}", problems)
        for key, typ in types.items():
            env_name = f"{ENV_PREFIX}{name.replace('.', '_')}_{key}".upper()
            if env_name in env:
                values[key] = _coerce(env[env_name], typ, env_name, problems)
                present = True
        for key, value in (overrides or {}).get(name, {}).items():
            if value is not None:
                values[key] = _coerce(value, types[key], f"--{key.replace('_', '-')}", problems)
                present = True
        built = replace(cls(), **{k: v for k, v in values.items() if v is not None})
        sections[name] = built if name not in _OPTIONAL or present else None
    for name in raw:
        if name not in {n.split(".")[0] for n in _SECTIONS}:
            problems.append(f"[{name}]: unknown section (known: node, log, replication, failover, targets)")
    for name in raw.get("targets", {}) if isinstance(raw.get("targets"), dict) else ():
        if f"targets.{name}" not in _SECTIONS:
            problems.append(f"[targets.{name}]: unknown target (known: national, city)")

    config = Config(
        node=sections["node"],
        log=sections["log"],
        replication=sections["replication"],
        failover=sections["failover"],
        national=sections["targets.national"],
        city=sections["targets.city"],
        source=source,
    )
    problems.extend(validate(config))
    if problems:
        raise ConfigError(problems)
    return config


def validate(config: Config) -> list[str]:
    """Every problem with a configuration, as one line each."""
    problems: list[str] = []
    node = config.node
    if not node.unit:
        problems.append("[node] unit: required: the 5-digit statistical code of this unit (e.g. 26743)")
    elif get_unit(node.unit) is None:
        problems.append(f"[node] unit: {node.unit!r} is not one of Ho Chi Minh City's 168 commune-level units")
    if not node.agency_code:
        problems.append("[node] agency_code: required: the unit's electronic agency code (e.g. 000.00.17.H29)")
    elif not is_agency_code(node.agency_code):
        problems.append(
            f"[node] agency_code: {node.agency_code!r} is not an agency code "
            "(digits, capital letters and dots, at most 35 characters)"
        )
    try:
        _, port = split_listen(node.listen)
        if not 0 <= port <= 65535:
            problems.append(f"[node] listen: port {port} out of range")
    except ValueError as exc:
        problems.append(f"[node] listen: {exc}")
    if not node.data_dir:
        problems.append("[node] data_dir: must not be empty")
    elif node.key_file and Path(node.key_file).resolve().is_relative_to(Path(node.data_dir).resolve()):
        problems.append(
            f"[node] key_file: {node.key_file!r} lies inside data_dir {node.data_dir!r}; keep the keyring outside"
            " it, so that a copy of the data does not carry the key that opens it"
        )
    if not 1024 <= node.max_body_bytes <= 64 * 1024 * 1024:
        problems.append("[node] max_body_bytes: must be between 1024 and 67108864")
    if not 64 <= node.sqlite_cache_kib <= 1024 * 1024:
        problems.append("[node] sqlite_cache_kib: must be between 64 and 1048576 (KiB per SQLite connection)")
    if not 1024 <= node.max_document_bytes <= 1024**3:
        problems.append("[node] max_document_bytes: must be between 1024 and 1073741824")
    for url in split_peer_urls(node.peer_urls):
        if origin_of(url) is None or urlsplit(url).path not in ("", "/"):
            problems.append(f"[node] peer_urls: {url!r} is not an http:// or https:// origin (scheme, host, port)")
    if node.public_url and not node.public_url.startswith(("http://", "https://")):
        problems.append(f"[node] public_url: must start with http:// or https://, got {node.public_url!r}")
    if node.shutdown_timeout_s <= 0:
        problems.append("[node] shutdown_timeout_s: must be positive")
    if node.procedure_catalogue:
        from node.desk.duedate import catalogue_problems

        problems.extend(f"[node] procedure_catalogue: {p}" for p in catalogue_problems(node.procedure_catalogue))
    problems.extend(tls.config_problems(config))
    if config.log.level.lower() not in {"debug", "info", "warning", "error"}:
        problems.append(f"[log] level: {config.log.level!r} is not one of debug, info, warning, error")
    for name, target, needed in (
        ("national", config.national, ("url", "username", "password", "dstcode", "madonvi")),
        ("city", config.city, ("url", "client_id", "client_secret")),
    ):
        if target is None:
            continue
        for key in needed:
            if not getattr(target, key):
                problems.append(f"[targets.{name}] {key}: required")
        url = str(getattr(target, "url", ""))
        if url and not url.startswith(("http://", "https://")):
            problems.append(f"[targets.{name}] url: must start with http:// or https://, got {url!r}")
        if getattr(target, "timeout_s", 1) <= 0:
            problems.append(f"[targets.{name}] timeout_s: must be positive")
    rep = config.replication
    if not 1 <= rep.batch_size <= 5000:
        problems.append("[replication] batch_size: must be between 1 and 5000")
    if rep.max_attempts < 1:
        problems.append("[replication] max_attempts: must be at least 1")
    if rep.antientropy_tick_s <= 0:
        problems.append("[replication] antientropy_tick_s: must be positive")
    if not 0 <= rep.push_linger_s <= 5:
        problems.append("[replication] push_linger_s: must be between 0 and 5")
    if rep.pull_tick_s <= 0:
        problems.append("[replication] pull_tick_s: must be positive")
    if rep.pull_idle_max_s < rep.pull_tick_s:
        problems.append("[replication] pull_idle_max_s: must be at least pull_tick_s")
    if rep.prune_tick_s <= 0:
        problems.append("[replication] prune_tick_s: must be positive")
    if not 1 <= rep.antientropy_buckets <= 4096:
        problems.append("[replication] antientropy_buckets: must be between 1 and 4096")
    fo = config.failover
    if fo.primary not in {"national", "city"}:
        problems.append(f"[failover] primary: {fo.primary!r} is not one of national, city")
    for key in (
        "probe_interval_s",
        "probe_timeout_s",
        "probe_quiet_s",
        "evaluate_s",
        "window_s",
        "open_base_s",
        "open_cap_s",
    ):
        if getattr(fo, key) <= 0:
            problems.append(f"[failover] {key}: must be positive")
    if fo.hold_s < 0:
        problems.append("[failover] hold_s: must not be negative")
    if fo.consecutive_failures < 1 or fo.min_calls < 1:
        problems.append("[failover] consecutive_failures and min_calls: must be at least 1")
    if not 0 < fo.failure_rate <= 1:
        problems.append("[failover] failure_rate: must be in (0, 1]")
    if config.log.format not in {"auto", "json", "console"}:
        problems.append(f"[log] format: {config.log.format!r} is not one of auto, json, console")
    return problems


# The credentials the upstream stand-ins accept unless told otherwise; real upstreams issue their own.
DEMO_USERNAME = "wardsync"
DEMO_PASSWORD = "wardsync-demo"
DEMO_CLIENT_ID = "wardsync"
DEMO_CLIENT_SECRET = "wardsync-demo"


def render_config(
    *,
    unit: str,
    agency_code: str,
    listen: str = DEFAULT_LISTEN,
    data_dir: str = DEFAULT_DATA_DIR,
    national_url: str | None = None,
    city_url: str | None = None,
    key_file: str = "",
) -> str:
    """A commented configuration file for ``wardsync init``."""
    u = get_unit(unit)
    name = u.name if u else "?"
    return _render_node(unit, agency_code, listen, data_dir, name, key_file) + _render_targets(
        agency_code, national_url, city_url
    )


def _render_targets(agency_code: str, national_url: str | None, city_url: str | None) -> str:
    text = """
[replication]
# Dossiers per push call, and per-record retriable failures before a dossier is parked.
batch_size = 500
max_attempts = 8
"""
    if national_url:
        text += f"""
[targets.national]
# National Public Service Portal (DVCQG), the primary. Credentials here or in WARDSYNC_TARGETS_NATIONAL_*.
url = "{national_url}"
username = "{DEMO_USERNAME}"
password = "{DEMO_PASSWORD}"
# Header the portal routes by, and the agency the node reports for.
dstcode = "{agency_code}"
madonvi = "{agency_code}"
timeout_s = 10.0
"""
    if city_url:
        text += f"""
[targets.city]
# The city's own administrative-procedure system, the backup (OAuth2 client credentials).
url = "{city_url}"
client_id = "{DEMO_CLIENT_ID}"
client_secret = "{DEMO_CLIENT_SECRET}"
timeout_s = 10.0
"""
    return text


def _render_node(unit: str, agency_code: str, listen: str, data_dir: str, name: str, key_file: str = "") -> str:
    keyring = (
        "# Keyring encrypting dossier contents at rest (wardsync key create/rotate); keep it outside data_dir.\n"
        f'key_file = "{key_file}"\n'
        if key_file
        else ""
    )
    return f"""\
# wardsync node configuration.
# Every setting can be overridden by an environment variable WARDSYNC_<SECTION>_<KEY>,
# for example WARDSYNC_NODE_LISTEN=0.0.0.0:8080.

[node]
# 5-digit statistical code of this commune-level unit (official registry, province 79): {name}
unit = "{unit}"
# Electronic agency code (mã định danh, Decision 20/2020/QĐ-TTg); prefix of every dossier code minted here.
agency_code = "{agency_code}"
# Address the HTTP API listens on (HOST:PORT).
listen = "{listen}"
# Where the SQLite store lives. Keep it on a local disk with room to grow.
data_dir = "{data_dir}"
# Largest request body accepted, in bytes.
max_body_bytes = {DEFAULT_MAX_BODY}
# On SIGTERM, how long in-flight requests may take to finish, in seconds.
shutdown_timeout_s = 30.0
{keyring}
[log]
# debug, info, warning or error.
level = "info"
# auto (console on a terminal, JSON otherwise), json or console.
format = "auto"
"""
