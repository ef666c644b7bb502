"""Convergence under any interleaving: several replicas, random operations, an unreliable network.

Replicas are real dossier Docs written through sync.doc (each with its own client id and its own
hybrid logical clock, some skewed); one replica plays the city system and merges with the stand-in's
own validation. Updates travel over a network that reorders, duplicates and loses them and can be
partitioned; lost updates are recovered by a final state-vector exchange (what anti-entropy does). At the
end every digest is equal, every step that any replica wrote is present exactly once, and the derived
status is the same everywhere.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc

from simulations.city_system import validate
from sync import doc as ydoc
from sync.hlc import HLC, Stamp
from sync.record import digest, materialise, step_key_of
from tests import factories

CODE = factories.code(1)
BASE_MS = 1_795_300_000_000


def _replica(seed_state: bytes, client_id: int) -> Doc[Any]:
    return ydoc.load_doc(CODE, seed_state, client_id)


ops = st.lists(
    st.tuples(
        st.integers(0, 3),  # replica
        st.sampled_from(["step", "field", "deliver", "deliver", "dup", "lose", "partition", "heal"]),
        st.integers(0, 10_000),
    ),
    min_size=5,
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, skews=st.lists(st.integers(-600_000, 600_000), min_size=4, max_size=4), seed=st.integers(0, 2**32))
def test_replicas_converge(ops: list[tuple[int, str, int]], skews: list[int], seed: int) -> None:
    rng = random.Random(seed)
    origin = factories.new_dossier(CODE, client_id=1, statuses=(2,))
    seed_state = origin.get_update()
    replicas = [_replica(seed_state, 100 + i) for i in range(4)]
    clocks = [HLC(physical=(lambda s=s: BASE_MS + s)) for s in skews]  # fixed, skewed physical clocks
    network: list[tuple[int, bytes]] = []  # (destination, update)
    cut: set[int] = set()
    written: set[str] = {step_key_of(s) for s in materialise(origin)[0]["QuaTrinhXuLy"]}
    tick = 0

    def broadcast(src: int, update: bytes) -> None:
        for dst in range(4):
            if dst != src:
                network.append((dst, update))

    for who, kind, n in ops:
        tick += 1
        doc = replicas[who]
        if kind == "step":
            status = [4, 5, 6, 7, 8, 9, 10][n % 7]
            step = factories.step(CODE, status, f"2026112209{tick // 60 % 60:02d}{tick % 60:02d}", officer=f"r{who}")
            stamp = clocks[who].now().encode()
            update = ydoc.change(doc, lambda d, step=step, stamp=stamp: ydoc.add_step(d, step, stamp) and None)
            written.add(step_key_of(step))
            broadcast(who, update)
        elif kind == "field":
            update = ydoc.change(doc, lambda d, n=n: ydoc.put_fields(d, {"ThongTinKhac": f"ghi chú {n}"}))
            broadcast(who, update)
        elif kind in ("deliver", "dup", "lose") and network:
            i = rng.randrange(len(network))
            dst, update = network[i]
            if kind != "dup":
                network.pop(i)
            if kind == "lose" or dst in cut:
                continue
            replicas[dst].apply_update(update)
            # A receiver's clock moves past what it saw (clamped if far ahead).
            for v in ydoc.steps_map(replicas[dst]).values():
                clocks[dst].observe(Stamp.decode(v["hlc"]))
        elif kind == "partition":
            cut.add(who)
        elif kind == "heal":
            cut.discard(who)

    # Retransmission: every pair exchanges what the other lacks, against its state vector.
    for _ in range(2):
        for a in replicas:
            for b in replicas:
                if a is not b:
                    b.apply_update(a.get_update(b.get_state()))
    # The city system merges a replica's state through its own validation.
    city = ydoc.load_doc(CODE, replicas[0].get_update(), 999)
    city_record = validate(city, CODE, frozenset())

    records = [materialise(r)[0] for r in replicas]
    digests = {digest(r) for r in records} | {digest(city_record)}
    assert len(digests) == 1
    keys = [step_key_of(s) for s in records[0]["QuaTrinhXuLy"]]
    assert len(keys) == len(set(keys)), "a step stored twice"
    assert set(keys) == written, "an acknowledged step was lost"
    assert len({r["TrangThaiHoSo"] for r in records}) == 1
