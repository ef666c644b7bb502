"""Edits of an accepted dossier: the If-Match precondition.

A desk reads a dossier (``GET /api/v1/dossiers/{code}`` answers with ``ETag: "<digest>"``) and sends its
correction with ``If-Match: "<digest>"``. The service compares that digest with the dossier's current one
inside the writer, in the same batch that applies the edit, so no change can slip in between: a stale
digest gets 412 with the current record. The edit itself is a Doc change like any other: journaled,
replicated to both upstreams, and merged with concurrent edits elsewhere by the same rules (a value that
lost a concurrent edit is kept in the dossier's conflicts). Which fields may change is
``node.domain.validation.EDITABLE_FIELDS``.
"""

from __future__ import annotations

import re

from node.errors import ApiError

# One entity tag: "hex digest", optionally weak (W/), as RFC 9110 writes it; a bare digest is accepted too.
_TAG = re.compile(r'\s*(?:W/)?"?([0-9a-f]{64})"?\s*')


def if_match_digests(header: str | None) -> tuple[str, ...]:
    """The digests an If-Match header names; 428 when it is missing, 400 when it names none."""
    if header is None or not header.strip():
        raise ApiError(
            428,
            "precondition_required",
            "send If-Match with the digest of the record you are correcting (the ETag of GET /api/v1/dossiers/{code})",
            fields={"If-Match": 'required: "<digest>" as read from the dossier\'s ETag'},
        )
    digests: list[str] = []
    for part in header.split(","):
        m = _TAG.fullmatch(part)
        if m is None:
            raise ApiError(
                400,
                "invalid_header",
                "If-Match must carry the dossier's digest as an entity tag",
                fields={"If-Match": '"<64 hex digits>", the ETag of GET /api/v1/dossiers/{code}'},
            )
        digests.append(m[1])
    return tuple(digests)
