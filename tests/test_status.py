"""Tests for the dossier status machine."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from node.domain.status import (
    FINAL,
    INITIAL,
    STATUS_LABELS_VI,
    STATUS_NAMES,
    TRANSITIONS,
    allowed_next,
    derive_status,
    is_legal,
)

ALL = range(1, 11)

# Transcribed from DOMAIN.md: 1→2, 1→3; 2→4; 4→5, 4→6, 4→8, 4→9; 5→4; 6→4; 9→10;
# 7 from any open state (1, 2, 4, 5, 6).
DOCUMENTED = {
    (1, 2),
    (1, 3),
    (2, 4),
    (4, 5),
    (4, 6),
    (4, 8),
    (4, 9),
    (5, 4),
    (6, 4),
    (9, 10),
} | {(s, 7) for s in (1, 2, 4, 5, 6)}


def reachable() -> set[int]:
    seen: set[int] = set()
    frontier = list(INITIAL)
    while frontier:
        status = frontier.pop()
        if status not in seen:
            seen.add(status)
            frontier.extend(TRANSITIONS[status])
    return seen


def reference_fold(statuses: list[int]) -> tuple[int | None, list[int]]:
    current: int | None = None
    skipped = []
    for i, s in enumerate(statuses):
        options = {1, 2} if current is None else {b for a, b in DOCUMENTED if a == current}
        if s in options:
            current = s
        else:
            skipped.append(i)
    return current, skipped


# 0 and 11 are not status codes; they must always be skipped.
statuses = st.lists(st.integers(min_value=0, max_value=11), max_size=30)


class TestTables:
    def test_names_cover_all_codes(self) -> None:
        """Every code 1..10 has an English name and a Vietnamese label."""
        assert set(STATUS_NAMES) == set(ALL)
        assert set(STATUS_LABELS_VI) == set(ALL)
        assert STATUS_NAMES[4] == "in_processing"
        assert STATUS_NAMES[10] == "returned"

    def test_initial(self) -> None:
        """A dossier starts registered online (1) or accepted at the desk (2)."""
        assert frozenset({1, 2}) == INITIAL
        assert allowed_next(None) == INITIAL

    def test_final(self) -> None:
        """3, 7, 8 and 10 are final."""
        assert frozenset({3, 7, 8, 10}) == FINAL
        for status in FINAL:
            assert allowed_next(status) == frozenset()

    def test_transitions_cover_all_codes(self) -> None:
        """TRANSITIONS has an entry for every status code."""
        assert set(TRANSITIONS) == set(ALL)


class TestLegality:
    def test_documented_transitions_are_legal(self) -> None:
        """Every transition listed in DOMAIN.md is legal."""
        for current, nxt in DOCUMENTED:
            assert is_legal(current, nxt), (current, nxt)

    def test_only_documented_transitions_are_legal(self) -> None:
        """No transition outside DOMAIN.md is legal."""
        for current in ALL:
            for nxt in range(0, 12):
                assert is_legal(current, nxt) == ((current, nxt) in DOCUMENTED), (current, nxt)

    def test_examples_of_illegal_transitions(self) -> None:
        """Skipping processing, reopening and un-refusing are illegal."""
        assert not is_legal(2, 9)
        assert not is_legal(10, 4)
        assert not is_legal(3, 2)
        assert not is_legal(4, 4)

    def test_first_step(self) -> None:
        """Only 1 and 2 may be the first step."""
        assert {s for s in range(0, 12) if is_legal(None, s)} == {1, 2}

    def test_unknown_current_allows_nothing(self) -> None:
        """An unknown current status has no successors."""
        assert allowed_next(42) == frozenset()
        assert not is_legal(42, 2)

    def test_bool_is_not_a_status(self) -> None:
        """True is not status 1, even though it compares equal to 1."""
        assert not is_legal(None, True)


class TestDeriveStatus:
    def test_empty(self) -> None:
        """No steps means no status."""
        assert derive_status([]) == (None, [])

    def test_happy_path(self) -> None:
        """Desk intake through to returning the result."""
        assert derive_status([2, 4, 5, 4, 6, 4, 9, 10]) == (10, [])

    def test_skips_illegal_steps(self) -> None:
        """Illegal steps are skipped and reported by index."""
        assert derive_status([2, 9, 4]) == (4, [1])
        assert derive_status([1, 1, 2]) == (2, [1])
        assert derive_status([4, 2]) == (2, [0])

    def test_final_status_absorbs(self) -> None:
        """Steps after a final status are all skipped."""
        assert derive_status([2, 7, 4, 9]) == (7, [2, 3])

    def test_accepts_any_iterable(self) -> None:
        """A generator works as well as a list."""
        assert derive_status(s for s in [2, 4]) == (4, [])

    @settings(max_examples=150)
    @given(statuses)
    def test_equals_reference_fold(self, steps: list[int]) -> None:
        """derive_status equals a straightforward fold over the documented table."""
        assert derive_status(steps) == reference_fold(steps)

    @settings(max_examples=150)
    @given(statuses)
    def test_lands_on_reachable_status(self, steps: list[int]) -> None:
        """The result is None or a status reachable from an initial one."""
        status, _ = derive_status(steps)
        assert status is None or status in reachable()

    @settings(max_examples=100)
    @given(statuses)
    def test_never_leaves_final(self, steps: list[int]) -> None:
        """Once a prefix lands on a final status, the whole sequence ends there."""
        final_status, _ = derive_status(steps)
        for end in range(len(steps) + 1):
            status, _ = derive_status(steps[:end])
            if status in FINAL:
                assert final_status == status
                break

    @settings(max_examples=100)
    @given(statuses)
    def test_kept_steps_replay_cleanly(self, steps: list[int]) -> None:
        """Replaying only the kept steps skips nothing and lands on the same status."""
        status, skipped = derive_status(steps)
        assert skipped == sorted(set(skipped))
        assert all(0 <= i < len(steps) for i in skipped)
        kept = [s for i, s in enumerate(steps) if i not in set(skipped)]
        assert derive_status(kept) == (status, [])

    @settings(max_examples=100)
    @given(statuses)
    def test_deterministic(self, steps: list[int]) -> None:
        """The same input always gives the same output and is not mutated."""
        before = list(steps)
        assert derive_status(steps) == derive_status(steps)
        assert steps == before
