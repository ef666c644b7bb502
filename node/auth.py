"""Who may call what: bearer tokens with roles, checked by one middleware.

Every handler carries its access rule: ``@requires("clerk", ...)`` (any of the roles) or ``@public``. A handler
with no rule is refused to everyone, so a forgotten marker fails closed.

Tokens are random 256-bit strings shown once at creation; the store keeps only their SHA-256. Browsers sign in
once with a token and get an HttpOnly, SameSite=Strict session cookie; a state-changing request made with the
cookie must also carry the session's CSRF token (header ``X-CSRF-Token`` or form field ``csrf``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from node.clock import Clock, iso
from node.errors import ApiError
from node.store import Store

log = structlog.get_logger()

ROLES: tuple[str, ...] = ("clerk", "operator", "drill", "peer", "read-only")
TOKEN_PREFIX = "wst_"
# The shortest token `wardsync token add` registers: a made token is 47 characters.
MIN_TOKEN_CHARS = 32
SESSION_COOKIE = "wardsync_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")

H = TypeVar("H", bound=Callable[..., Awaitable[Any]])

_RULE = "__wardsync_roles__"
PUBLIC: frozenset[str] = frozenset({"*"})


def requires(*roles: str) -> Callable[[H], H]:
    """Allow the handler to a caller holding any of ``roles``."""
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise ValueError(f"unknown roles {unknown!r}; roles are {', '.join(ROLES)}")

    def mark(handler: H) -> H:
        setattr(handler, _RULE, frozenset(roles))
        return handler

    return mark


def public(handler: H) -> H:
    """Allow the handler to anyone, without a token (liveness and readiness probes, the sign-in page)."""
    setattr(handler, _RULE, PUBLIC)
    return handler


def rule_of(handler: object) -> frozenset[str] | None:
    """The roles a handler admits, ``PUBLIC``, or None when it carries no rule."""
    return getattr(handler, _RULE, None)


def parse_roles(text: str | Iterable[str]) -> list[str]:
    """``"clerk,operator"`` or a list -> the roles, in ROLES order; ValueError naming any unknown one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    wanted = {r.strip() for r in items if r.strip()}
    unknown = sorted(wanted - set(ROLES))
    if unknown or not wanted:
        raise ValueError(f"unknown role(s) {', '.join(unknown) or '(none given)'}; roles are {', '.join(ROLES)}")
    return [r for r in ROLES if r in wanted]


def same_secret(sent: str, expected: str) -> bool:
    """Constant-time comparison of a secret a client sent with ours; whatever text it sends is merely unequal.

    ``hmac.compare_digest`` refuses str with non-ASCII characters (a TypeError, so a 500), hence bytes.
    """
    return hmac.compare_digest(sent.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id and name and the roles it holds."""

    token_id: int
    name: str
    roles: frozenset[str]


@dataclass(frozen=True)
class Session:
    """A signed-in browser: its cookie value, its CSRF token and when it ends (monotonic seconds)."""

    id: str
    csrf: str
    principal: Principal
    expires: float


@dataclass(frozen=True)
class TokenInfo:
    id: int
    name: str
    roles: tuple[str, ...]
    created_at: str
    revoked_at: str | None


class Auth:
    """Tokens (hashes in the store, a short-lived cache in memory), browser sessions and the failure limiter.

    A cached token is re-read from the store after ``recheck_s`` seconds, so a token revoked by
    ``wardsync token revoke`` in another process stops working within that time (at once after SIGHUP).
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        recheck_s: float = 30.0,
        session_ttl_s: float = 8 * 3600.0,
        max_sessions: int = 1000,
        max_failures: int = 10,
        failure_window_s: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.clock = clock
        self.recheck_s = recheck_s
        self.session_ttl_s = session_ttl_s
        self.max_sessions = max_sessions
        self.max_failures = max_failures
        self.failure_window_s = failure_window_s
        self._now = monotonic
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._failures: dict[str, deque[float]] = {}

    # -- tokens ---------------------------------------------------------------------------------

    async def create_token(self, roles: str | Iterable[str], name: str = "") -> str:
        """Make a token holding ``roles``; store its hash; return the token (shown once, never stored)."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        await self.add_token(token, roles, name)
        return token

    async def add_token(self, token: str, roles: str | Iterable[str], name: str = "") -> int:
        """Register a token made elsewhere (one peer token shared by every unit's node); its id.

        Raises ValueError for a token too short to be a secret or one this node already holds.
        """
        wanted = parse_roles(roles)
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
            raise ValueError(f"a token must be at least {MIN_TOKEN_CHARS} characters without spaces")
        digest = token_hash(token)
        if await self.store.fetchone("SELECT 1 FROM tokens WHERE hash = ?", (digest,)) is not None:
            raise ValueError("this token is already registered on this node (see 'wardsync token list')")
        label = name or ",".join(wanted)
        at = iso(self.clock.now())

        def insert(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO tokens (name, roles, hash, created_at) VALUES (?, ?, ?, ?)",
                (label, ",".join(wanted), digest, at),
            )
            return int(cur.lastrowid or 0)

        token_id = await self.store.write(insert)
        self._cache[digest] = (Principal(token_id, label, frozenset(wanted)), self._now())
        log.info("token_created", token_id=token_id, name=label, roles=wanted)
        return token_id

    async def revoke(self, token_id: int) -> bool:
        at = iso(self.clock.now())

        def update(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (at, token_id)
            ).rowcount

        changed = await self.store.write(update) > 0
        self._cache = {h: entry for h, entry in self._cache.items() if entry[0].token_id != token_id}
        for sid in [s.id for s in self._sessions.values() if s.principal.token_id == token_id]:
            del self._sessions[sid]
        if changed:
            log.info("token_revoked", token_id=token_id)
        return changed

    async def list_tokens(self) -> list[TokenInfo]:
        rows = await self.store.fetchall("SELECT id, name, roles, created_at, revoked_at FROM tokens ORDER BY id")
        return [TokenInfo(r[0], r[1], tuple(r[2].split(",")), r[3], r[4]) for r in rows]

    def reload(self) -> None:
        """Forget every cached token and session check: the next request of each re-reads the store."""
        self._cache.clear()
        log.info("tokens_reloaded")

    async def verify(self, token: str) -> Principal | None:
        """The principal a token stands for, or None when it is unknown or revoked."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        digest = token_hash(token)
        cached = self._cache.get(digest)
        if cached is not None and self._now() - cached[1] < self.recheck_s:
            return cached[0]
        row = await self.store.fetchone(
            "SELECT id, name, roles, hash FROM tokens WHERE hash = ? AND revoked_at IS NULL", (digest,)
        )
        # The lookup is by hash; the final comparison is constant-time all the same.
        if row is None or not hmac.compare_digest(str(row[3]), digest):
            self._cache.pop(digest, None)
            return None
        principal = Principal(int(row[0]), str(row[1]), frozenset(str(row[2]).split(",")))
        self._cache[digest] = (principal, self._now())
        return principal

    # -- browser sessions -----------------------------------------------------------------------

    def open_session(self, principal: Principal) -> Session:
        """A new browser session for ``principal``; the oldest is dropped past ``max_sessions``."""
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            principal=principal,
            expires=self._now() + self.session_ttl_s,
        )
        self._sessions[session.id] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return session

    def session(self, session_id: str) -> Session | None:
        found = self._sessions.get(session_id)
        if found is None:
            return None
        if found.expires <= self._now():
            del self._sessions[session_id]
            return None
        return found

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    # -- failed attempts ------------------------------------------------------------------------

    def blocked_for(self, remote: str) -> float:
        """Seconds until ``remote`` may try again; 0 when it is not blocked."""
        window = self._failures.get(remote)
        if not window:
            return 0.0
        now = self._now()
        while window and now - window[0] >= self.failure_window_s:
            window.popleft()
        if len(window) < self.max_failures:
            return 0.0
        return max(0.1, self.failure_window_s - (now - window[0]))

    def record_failure(self, remote: str) -> None:
        window = self._failures.setdefault(remote, deque())
        window.append(self._now())
        while len(window) > self.max_failures:
            window.popleft()
        if len(self._failures) > 10_000:  # a flood of distinct addresses must not grow memory without end
            for key in list(self._failures)[:5_000]:
                del self._failures[key]


AUTH: web.AppKey[Auth] = web.AppKey("auth", Auth)
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)
SESSION: web.RequestKey[Session] = web.RequestKey("session", Session)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise ApiError(401, "invalid_authorization", "send the token as 'Authorization: Bearer TOKEN'")
    return value.strip()


def _wants_html(request: web.Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("Accept", "")


async def read_form(request: web.Request) -> Any:
    """The request's form fields; a malformed form body is the client's error (400), never a 500."""
    try:
        return await request.post()
    except (ValueError, BadHttpMessage) as exc:  # how aiohttp's form parsers refuse a broken body or part header
        raise ApiError(400, "malformed_form", f"the form body is malformed: {exc}") from exc


def _has_login(request: web.Request) -> bool:
    return any(getattr(r, "canonical", None) == "/login" for r in request.app.router.resources())


@web.middleware
async def auth_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    """Check the caller's token or session against the handler's rule; 401, 403 or 429 otherwise."""
    if request.match_info.http_exception is not None:
        return await handler(request)  # no such route: the error middleware answers 404/405
    rule = rule_of(request.match_info.handler)
    if rule == PUBLIC:
        return await handler(request)
    auth = request.app[AUTH]
    remote = request.remote or "unknown"
    wait = auth.blocked_for(remote)
    if wait:
        raise ApiError(
            429,
            "too_many_failed_attempts",
            f"too many failed sign-in attempts from this address; try again in {wait:.0f} s",
            headers={"Retry-After": str(int(wait) + 1)},
        )
    principal: Principal | None = None
    token = _bearer(request)
    if token is not None:
        principal = await auth.verify(token)
        if principal is None:
            auth.record_failure(remote)
            log.warning("auth_failed", reason="unknown_token", remote=remote, method=request.method, path=request.path)
            raise ApiError(
                401, "invalid_token", "the bearer token is unknown or revoked", headers={"WWW-Authenticate": "Bearer"}
            )
    else:
        cookie = request.cookies.get(SESSION_COOKIE)
        session = auth.session(cookie) if cookie else None
        if session is not None:
            if request.method not in SAFE_METHODS:
                sent = request.headers.get(CSRF_HEADER)
                if sent is None and request.content_type in _FORMS:
                    form = await read_form(request)
                    field = form.get("csrf")
                    sent = field if isinstance(field, str) else None
                if sent is None or not same_secret(sent, session.csrf):
                    log.warning("auth_failed", reason="csrf", remote=remote, method=request.method, path=request.path)
                    raise ApiError(403, "csrf_failed", f"a signed-in browser must send its {CSRF_HEADER} with changes")
            principal = session.principal
            request[SESSION] = session
    if principal is None:
        if _wants_html(request) and _has_login(request):
            raise web.HTTPSeeOther(f"/login?next={request.rel_url.path}")
        raise ApiError(
            401,
            "unauthenticated",
            "this route needs a token: send 'Authorization: Bearer TOKEN' "
            "(an operator creates one with 'wardsync token create --role ROLE')",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if rule is None or not (principal.roles & rule):
        needed = ", ".join(sorted(rule)) if rule else "(none: this route has no access rule)"
        log.warning(
            "auth_forbidden", token_id=principal.token_id, roles=sorted(principal.roles), path=request.path
        )
        raise ApiError(
            403,
            "forbidden",
            f"the token {principal.name!r} holds {', '.join(sorted(principal.roles))}; "
            f"{request.method} {request.path} needs one of: {needed}",
        )
    request[PRINCIPAL] = principal
    return await handler(request)
