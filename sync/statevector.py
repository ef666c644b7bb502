"""Y state vectors: decoding and comparison, shared by the city adapter and the city stand-in."""

from __future__ import annotations

from collections.abc import Mapping

# What to diff against when the other side holds nothing of a Doc: the full state. A real (empty) state
# vector rather than None, so a caller that keeps its old ack when handed None still sends everything.
EMPTY_STATE_VECTOR = b"\x00"


def decode_state_vector(sv: bytes) -> dict[int, int]:
    """``{client: clock}`` of an encoded state vector, without zero entries (they mean "nothing yet")."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= len(sv):
                raise ValueError("truncated state vector")
            byte = sv[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    count = varint()
    clocks: dict[int, int] = {}
    for _ in range(count):
        client, clock = varint(), varint()
        if clock:
            clocks[client] = clock
    if pos != len(sv):
        raise ValueError("trailing bytes after state vector")
    return clocks


def covers(theirs: Mapping[int, int], ours: Mapping[int, int]) -> bool:
    """Whether a state vector includes everything another one has seen."""
    return all(theirs.get(client, 0) >= clock for client, clock in ours.items())
