"""A rank dies mid-operation: every survivor raises an error naming the operation,
the stage and the missing peer, within the buffer's timeout, and can exit cleanly."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch.distributed as dist

import epcomm
from cases import Case, make_input
from epcomm._comm import GroupComm

CASE = Case(num_nodes=2, nvl=2, tokens=(20, 14, 9, 17), seed=4)
VICTIM = 3


def die_mid_operation(rank, world, op, stage, timeout_s):
    """Rank VICTIM kills itself (SIGKILL) on entering ``stage`` of ``op``."""
    if rank == VICTIM:
        original = GroupComm._run

        def run_or_die(self, op_, stage_, start):
            if (op_, stage_) == (op, stage):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, op_, stage_, start)

        GroupComm._run = run_or_die
    buf = epcomm.Buffer(None, num_nvl_ranks=CASE.nvl, algorithm="two_hop", timeout_s=timeout_s)
    inp = make_input(CASE, rank)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx, CASE.num_experts)
    start = time.monotonic()
    try:
        recv_x, _, _, _, handle, _ = buf.dispatch(
            inp.x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=inp.topk_idx,
        )
        buf.combine(recv_x, handle)
    except epcomm.EpcommError as err:
        waited = time.monotonic() - start
        # a second call fails at once, saying the group is gone, instead of hanging
        try:
            buf.combine(recv_x if "recv_x" in locals() else inp.x, handle if "handle" in locals() else None)
        except epcomm.EpcommError as again:
            second = str(again)
        exit_start = time.monotonic()
        dist.destroy_process_group()
        return type(err).__name__, str(err), waited, second, time.monotonic() - exit_start
    return ("no error", None, None, None, None)


def _dispatch_combine_until_failure(buf, inp, num_experts):
    """Dispatch + combine; on the (expected) failure: what was raised, how long it took, what a second
    call says, and how long the process group takes to shut down.

    (die_mid_operation keeps its own copy of these lines: routed through this function, the torch
    test's survivors were diagnosed as heartbeat-dead when it ran right after the hypothesis tests on
    the same pool, for a reason not yet understood; see the session note.)"""
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx, num_experts)
    start = time.monotonic()
    recv_x, handle = inp.x, None
    try:
        recv_x, _, _, _, handle, _ = buf.dispatch(
            inp.x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=inp.topk_idx,
        )
        buf.combine(recv_x, handle)
    except epcomm.EpcommError as err:
        waited = time.monotonic() - start
        # a second call fails at once, saying the group is gone, instead of hanging
        try:
            buf.combine(recv_x, handle)
        except epcomm.EpcommError as again:
            second = str(again)
        exit_start = time.monotonic()
        dist.destroy_process_group()
        return type(err).__name__, str(err), waited, second, time.monotonic() - exit_start
    return ("no error", None, None, None, None)


def survivor_messages(pool, fn, *args, timeout_s: float):
    """Run ``fn`` (which kills VICTIM) on every rank; check what every survivor saw; yield (rank, message)."""
    try:
        outcomes = pool.run_outcomes(fn, *args, timeout_s, timeout=60)
    finally:
        pool.close()
    assert outcomes[VICTIM].error_type == "died"
    for rank in range(len(outcomes)):
        if rank == VICTIM:
            continue
        kind, message, waited, second, exit_s = outcomes[rank].value
        assert kind in ("EpcommPeerError", "EpcommTimeoutError"), outcomes[rank]
        assert f"no heartbeat: rank {VICTIM} " in message, message
        assert waited < timeout_s + 5, f"rank {rank} took {waited:.1f} s to notice"
        assert "process group failed earlier" in second, second
        assert exit_s < 10, f"rank {rank} took {exit_s:.1f} s to shut down"
        yield rank, message


@pytest.mark.parametrize("op,stage", [
    ("dispatch", "agree"), ("dispatch", "network hop"), ("dispatch", "nvlink hop"), ("combine", "network hop"),
])
def test_killed_rank_is_named_by_every_survivor(pools, op, stage):
    for _, message in survivor_messages(pools(4), die_mid_operation, op, stage, timeout_s=10.0):
        assert f"epcomm {op}" in message or "epcomm combine" in message, message


SIM_CASE = Case(num_nodes=1, nvl=4, tokens=(20, 14, 9, 17), seed=4)


def die_in_sim_kernel(rank, world, kernel, nodes, timeout_s):
    """Rank VICTIM kills itself (SIGKILL) as it is about to run ``kernel``: its peers wait in the kernel."""
    from epcomm.backends.sim_backend import SimRuntime

    if rank == VICTIM:
        for name in ("run", "enqueue"):  # waited-for kernels and data kernels (issued only)
            original = getattr(SimRuntime, name)

            def run_or_die(self, spec, params, *args, _original=original, **kwargs):
                if type(params).KERNEL == kernel:
                    os.kill(os.getpid(), signal.SIGKILL)
                return _original(self, spec, params, *args, **kwargs)

            setattr(SimRuntime, name, run_or_die)
    case = SIM_CASE if nodes == 1 else CASE
    buf = epcomm.Buffer(None, backend="sim", num_nvl_ranks=case.nvl, timeout_s=timeout_s)
    return _dispatch_combine_until_failure(buf, make_input(case, rank), case.num_experts)


@pytest.mark.parametrize("kernel,op,nodes", [
    ("intranode_dispatch", "dispatch", 1), ("intranode_combine", "combine", 1),
    ("internode_dispatch", "dispatch", 2), ("internode_combine", "combine", 2),
])
def test_sim_rank_killed_before_a_kernel_is_named(pools, kernel, op, nodes):
    """The survivors' kernels stop waiting at the timeout (or at a peer's abort, which crosses nodes);
    the error names the kernel and the dead rank."""
    for rank, message in survivor_messages(pools(4), die_in_sim_kernel, kernel, nodes, timeout_s=4.0):
        assert f"epcomm {op}: stage 'kernel {kernel}' on rank {rank}" in message, message
        assert f"{kernel} " in message and ("timeout" in message or "peer_aborted" in message), message


class _KeyGoneAfterCheck:
    """A store whose check still sees a key its owner has just deleted (a peer dropping its Buffer between
    a diagnosing rank's check and get)."""

    def __init__(self, store) -> None:
        self.store = store

    @property
    def timeout(self):
        return self.store.timeout

    def set_timeout(self, timeout) -> None:
        self.store.set_timeout(timeout)

    def check(self, keys) -> bool:
        return True

    def get(self, key):
        return self.store.get(key)


def test_a_key_deleted_between_check_and_get_reads_as_absent(tmp_path):
    """Diagnosing a failure reads every peer's heartbeat; a peer that drops its Buffer meanwhile deletes its key.
    The read must say "absent" within seconds, not wait out the store's timeout (minutes), and leave that
    timeout as it was."""
    import datetime

    from epcomm._progress import read_present

    store = dist.FileStore(str(tmp_path / "store"), 1)
    store.set_timeout(datetime.timedelta(seconds=20))  # (a read that waits it out fails the time bound below)
    store.set("beat/0", "7")
    start = time.monotonic()
    assert read_present(_KeyGoneAfterCheck(store), ["beat/0", "beat/1"]) == ["7", None]
    assert time.monotonic() - start < 10
    assert store.timeout == datetime.timedelta(seconds=20)
