"""Who may call what: bearer tokens with roles, checked by one middleware.

Every handler carries its access rule: ``@requires("clerk", ...)`` (any of the roles) or ``@public``. A handler
with no rule is refused to everyone, so a forgotten marker fails closed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

ROLES: tuple[str, ...] = ("clerk", "operator", "drill", "peer", "read-only")

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
    """Allow the handler to anyone, without a token (liveness and readiness probes only)."""
    setattr(handler, _RULE, PUBLIC)
    return handler


def rule_of(handler: object) -> frozenset[str] | None:
    """The roles a handler admits, ``PUBLIC``, or None when it carries no rule."""
    return getattr(handler, _RULE, None)
