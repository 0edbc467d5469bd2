"""examples/overlap.py, small, on the rank pool: the dual micro-batch schedule (two Buffers,
async_finish=True) gives the serial schedule's outputs bit for bit, and its calls really return
before their data phase is done."""

from __future__ import annotations

import pytest


def tiny_overlap(rank, world, backend):
    from examples.overlap import Settings, run

    s = Settings(backend=backend, tokens=16, hidden=32, ffn=32, shared_ffn=32, experts=8, topk=3, max_nodes=2,
                 nvl_ranks=2, steps=2, warmup=1)
    return run(s)


@pytest.mark.parametrize("backend", ["torch", "sim"])
def test_overlapped_schedule_matches_serial_and_is_asynchronous(pools, backend):
    """2 nodes x 2 ranks: A's and B's dispatches in flight together, each micro-batch's experts
    computed while the other's rows travel; every output equals the serial schedule's (torch.equal,
    checked by the example on every rank and step)."""
    results = pools(4).run(tiny_overlap, backend)
    for rank, r in enumerate(results):
        assert r["ok"] and r["mismatches"] == 0, (rank, r)
        assert r["async_calls"] == 4 * 3, (rank, r)  # 2 dispatches + 2 combines per step, 3 steps
        # query() right after the call returned: at least one data phase was still running on every rank
        assert r["pending_at_return"] >= 1, (rank, r)
        assert r["world"] == 4
    # the timings are all-reduced (slowest rank): every rank reports the same numbers
    assert len({(r["serial_ms"], r["overlapped_ms"], r["comm_ms"]) for r in results}) == 1
    assert all(r["serial_ms"] > 0 and r["overlapped_ms"] > 0 and r["comm_ms"] > 0 for r in results)
