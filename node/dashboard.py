"""The node dashboard at ``/``: replication status, lag over the last hour, failover events, dead letters
with a retry action, look-up by dossier code; and the sign-in page that turns a token into a session cookie.

Pages are rendered on the server (jinja2, autoescaped); a little JavaScript polls ``/dashboard/panels``
for fresh HTML and sends the retry action with the session's CSRF token. No inline script or style, so the
pages carry a strict Content-Security-Policy.
"""

from __future__ import annotations

import collections
import functools
import importlib.resources
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import jinja2
import structlog
from aiohttp import web

from node import api, auth
from node.domain.status import STATUS_LABELS_VI, STATUS_NAMES
from node.errors import ApiError
from node.registry import get_unit

if TYPE_CHECKING:
    from node.app import Node

log = structlog.get_logger()

HISTORY_INTERVAL_S = 10.0
HISTORY_POINTS = 360  # one hour at one sample every 10 s
POLL_MS = 2000

# Who may look at the dashboard: the roles that may read dead letters and dossiers through the API. Acting
# from it (retry) goes through the API route and its own rule.
VIEW_ROLES = ("operator", "read-only")
LOGIN_CSRF_COOKIE = "wardsync_login_csrf"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_STATIC = {
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
    "fleet.js": "text/javascript",
}

TARGET_LABELS = {"national": "Cổng DVC quốc gia · National portal", "city": "Hệ thống của Thành phố · City system"}
HEALTH_LABELS = {"healthy": "Ổn định · Healthy", "degraded": "Suy giảm · Degraded", "down": "Ngừng · Down"}
BREAKER_LABELS = {"closed": "Đóng · Closed", "open": "Mở · Open", "half_open": "Nửa mở · Half-open"}


class StatusHistory:
    """A ring buffer of the node's replication state, sampled every ``interval_s`` (one hour by default)."""

    def __init__(self, node: Node, *, interval_s: float = HISTORY_INTERVAL_S, size: int = HISTORY_POINTS) -> None:
        self.node = node
        self.interval_s = interval_s
        self.points: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)

    async def sample(self) -> bool:
        """Take one sample; a ``Loop`` step (never more work right away)."""
        node = self.node
        head = node.service.journal_head
        targets: dict[str, Any] = {}
        for name, rep in node.replicators.items():
            lag = await rep.lag(head)
            breaker = node.breakers.get(name)
            targets[name] = {
                "lag_records": lag["lag_records"],
                "lag_seconds": lag["lag_seconds"],
                "breaker": breaker.state.value if breaker is not None else None,
            }
        controller = node.controller
        self.points.append(
            {
                "at": node.clock.now().isoformat(timespec="seconds"),
                "journal_head": head,
                "active_source": controller.active if controller is not None else None,
                "targets": targets,
            }
        )
        return False

    def describe(self) -> dict[str, Any]:
        return {"interval_s": self.interval_s, "size": self.points.maxlen, "points": list(self.points)}


# -- rendering helpers shared with the fleet dashboard ---------------------------------------------------


@functools.cache
def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("node", "web/templates"),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(TARGET_LABELS=TARGET_LABELS, HEALTH_LABELS=HEALTH_LABELS, BREAKER_LABELS=BREAKER_LABELS)
    return env


def secure_headers(response: web.StreamResponse) -> web.StreamResponse:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


def render(name: str, http_status: int = 200, **context: Any) -> web.Response:
    html = templates().get_template(name).render(**context)
    response = web.Response(status=http_status, text=html, content_type="text/html", charset="utf-8")
    secure_headers(response)
    return response


@functools.cache
def _static_bytes(name: str) -> bytes:
    return importlib.resources.files("node").joinpath("web", "static", name).read_bytes()


@auth.public
async def static(request: web.Request) -> web.Response:
    """The dashboards' CSS and JavaScript (public: the sign-in page needs them)."""
    name = request.match_info["name"]
    if name not in _STATIC:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    response = web.Response(body=_static_bytes(name), content_type=_STATIC[name], charset="utf-8")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


# -- sign-in -----------------------------------------------------------------------------------------------


def _safe_next(raw: str | None) -> str:
    """Only a path on this site; anything else (``//host``, ``https://``) goes to the dashboard."""
    if not raw or not raw.startswith("/") or raw.startswith("//") or "\\" in raw or any(c < " " for c in raw):
        return "/"
    return raw


def _login_page(request: web.Request, *, status: int = 200, error: str | None = None, nxt: str = "/") -> web.Response:
    # Login CSRF: a form posted from another site has no way to read or set this cookie's value.
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
    unit = request.app[api.UNIT]
    found = get_unit(unit)
    response = render(
        "login.html",
        http_status=status,
        error=error,
        next=nxt,
        csrf=token,
        unit=unit,
        unit_name=found.name if found else "",
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE, token, httponly=True, samesite="Strict", secure=request.secure, path="/login"
    )
    return response


@auth.public
async def login_form(request: web.Request) -> web.Response:
    """The sign-in form."""
    return _login_page(request, nxt=_safe_next(request.query.get("next")))


def _auth(request: web.Request) -> auth.Auth:
    return request.app[auth.AUTH]


@auth.public
async def login(request: web.Request) -> web.Response:
    """Exchange a token for an HttpOnly, SameSite=Strict session cookie."""
    form = await auth.read_form(request)
    nxt = _safe_next(str(form.get("next") or "/"))
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    sent = str(form.get("csrf") or "")
    if not expected or not auth.same_secret(sent, expected):
        return _login_page(
            request, status=403, nxt=nxt, error="Biểu mẫu đã hết hạn, hãy thử lại · The form expired, try again"
        )
    guard = _auth(request)
    remote = request.remote or "unknown"
    if wait := guard.blocked_for(remote):
        response = _login_page(
            request,
            status=429,
            nxt=nxt,
            error=f"Sai quá nhiều lần, thử lại sau {wait:.0f} giây · "
            f"Too many failed attempts, try again in {wait:.0f} s",
        )
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    token = str(form.get("token") or "").strip()
    principal = await guard.verify(token) if token else None
    if principal is None:
        guard.record_failure(remote)
        log.warning("dashboard_sign_in_failed", remote=remote)
        return _login_page(request, status=401, nxt=nxt, error="Mã truy cập không hợp lệ · Invalid token")
    if not principal.roles & set(VIEW_ROLES):
        return _login_page(
            request,
            status=403,
            nxt=nxt,
            error="Mã truy cập này không được xem bảng điều khiển · This token may not view the dashboard "
            f"(needs one of: {', '.join(VIEW_ROLES)})",
        )
    session = guard.open_session(principal)
    log.info("dashboard_signed_in", token_id=principal.token_id, name=principal.name)
    response = web.HTTPSeeOther(nxt)
    response.set_cookie(
        auth.SESSION_COOKIE, session.id, httponly=True, samesite="Strict", secure=request.secure, path="/"
    )
    response.del_cookie(LOGIN_CSRF_COOKIE, path="/login")
    secure_headers(response)
    raise response


@auth.public
async def logout(request: web.Request) -> web.Response:
    """End the session; needs the page's CSRF token, so another site cannot sign anyone out."""
    guard = _auth(request)
    sid = request.cookies.get(auth.SESSION_COOKIE, "")
    session = guard.session(sid) if sid else None
    if session is not None:
        form = await auth.read_form(request)
        sent = str(form.get("csrf") or request.headers.get(auth.CSRF_HEADER) or "")
        if not auth.same_secret(sent, session.csrf):
            raise ApiError(403, "csrf_failed", "a signed-in browser must send its CSRF token to sign out")
        guard.close_session(sid)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(auth.SESSION_COOKIE, path="/")
    secure_headers(response)
    raise response


# -- the node dashboard ------------------------------------------------------------------------------------


async def _json_of(handler: Callable[[web.Request], Awaitable[web.Response]], request: web.Request) -> Any:
    """Reuse an API handler's answer, so the dashboard shows exactly what the API says."""
    response = await handler(request)
    return json.loads(response.text or "null")


def sparkline(points: list[dict[str, Any]], target: str, *, width: int = 360, height: int = 48) -> dict[str, Any]:
    """SVG polyline points for one target's lag (records) over the buffered hour."""
    values = [float(p["targets"].get(target, {}).get("lag_records") or 0) for p in points if target in p["targets"]]
    if not values:
        return {"points": "", "max": 0, "last": None, "width": width, "height": height, "n": 0}
    top = max(values) or 1.0
    step = width / max(1, len(values) - 1)
    coords = " ".join(
        f"{round(i * step, 1)},{round(height - 2 - (v / top) * (height - 4), 1)}" for i, v in enumerate(values)
    )
    return {"points": coords, "max": int(max(values)), "last": int(values[-1]), "width": width, "height": height,
            "n": len(values)}


async def _panels_context(request: web.Request) -> dict[str, Any]:
    node = request.app[api.NODE]
    status = await _json_of(api.status, request)
    letters = await _json_of(api.dead_letters, request)
    history: StatusHistory | None = getattr(node, "history", None)
    points = list(history.points) if history is not None else []
    return {
        "status": status,
        "dead_letters": letters["items"],
        "sparklines": {name: sparkline(points, name) for name in status["targets"]},
        "history_interval_s": history.interval_s if history is not None else HISTORY_INTERVAL_S,
        "events": list(reversed(status["events"]))[:20],
    }


@auth.requires(*VIEW_ROLES)
async def page(request: web.Request) -> web.Response:
    """The node dashboard."""
    unit = request.app[api.UNIT]
    found = get_unit(unit)
    return render(
        "node.html",
        unit=unit,
        unit_name=found.name if found else "",
        csrf=session.csrf if (session := request.get(auth.SESSION)) is not None else "",
        poll_ms=POLL_MS,
        **await _panels_context(request),
    )


@auth.requires(*VIEW_ROLES)
async def panels(request: web.Request) -> web.Response:
    """The live part of the dashboard as an HTML fragment, polled by the page."""
    return render("node_panels.html", **await _panels_context(request))


_DOSSIER_FIELDS = (
    ("MaHoSo", "Mã hồ sơ · Code"),
    ("TenTTHC", "Thủ tục · Procedure"),
    ("ChuHoSo", "Chủ hồ sơ · Applicant"),
    ("SoGiayToChuHoSo", "Số giấy tờ · ID number"),
    ("NgayTiepNhan", "Ngày tiếp nhận · Received"),
    ("NgayHenTra", "Ngày hẹn trả · Due"),
    ("DonViXuLy", "Đơn vị xử lý · Handling unit"),
    ("MaDonViXuLy", "Đơn vị có thẩm quyền · Competent unit"),
)


def _mask_id(value: Any) -> str:
    # The dashboard is for watching replication; a citizen ID is shown only enough to tell dossiers apart.
    text = str(value or "")
    return "•" * max(0, len(text) - 4) + text[-4:]


@auth.requires(*VIEW_ROLES)
async def dossier(request: web.Request) -> web.Response:
    """One dossier as an HTML fragment: key fields, status, steps and replication per target."""
    code = request.match_info["code"]
    try:
        record = await _json_of(api.get_dossier, request)
    except ApiError as err:
        if err.status != 404:
            raise
        return render("dossier.html", http_status=404, code=code, record=None)
    rows = []
    for key, label in _DOSSIER_FIELDS:
        if record.get(key) not in (None, ""):
            value = _mask_id(record[key]) if key == "SoGiayToChuHoSo" else record[key]
            rows.append((label, value))
    status = record.get("TrangThaiHoSo")
    return render(
        "dossier.html",
        code=code,
        record=record,
        rows=rows,
        status=status,
        status_vi=STATUS_LABELS_VI.get(status, "") if isinstance(status, int) else "",
        status_en=STATUS_NAMES.get(status, "").replace("_", " ") if isinstance(status, int) else "",
        steps=record.get("QuaTrinhXuLy") or [],
        replication=record.get("replication") or {},
    )


@auth.requires(*VIEW_ROLES)
async def history(request: web.Request) -> web.Response:
    """The buffered samples of replication lag, breaker and active source (the last hour)."""
    node = request.app[api.NODE]
    hist: StatusHistory | None = getattr(node, "history", None)
    body = hist.describe() if hist is not None else {"interval_s": HISTORY_INTERVAL_S, "size": 0, "points": []}
    return api.json_response(body)


def add_routes(app: web.Application) -> None:
    """The dashboard's pages, its JSON history and the sign-in page."""
    app.router.add_get("/", page)
    app.router.add_get("/dashboard/panels", panels)
    app.router.add_get("/dashboard/dossiers/{code}", dossier)
    app.router.add_get("/dashboard/static/{name}", static)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/api/v1/status/history", history)
