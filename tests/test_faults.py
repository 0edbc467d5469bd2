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


@pytest.mark.parametrize("op,stage", [
    ("dispatch", "agree"), ("dispatch", "network hop"), ("dispatch", "nvlink hop"), ("combine", "network hop"),
])
def test_killed_rank_is_named_by_every_survivor(pools, op, stage):
    pool = pools(4)
    try:
        outcomes = pool.run_outcomes(die_mid_operation, op, stage, 10.0, timeout=60)
    finally:
        pool.close()
    assert outcomes[VICTIM].error_type == "died"
    for rank in range(4):
        if rank == VICTIM:
            continue
        kind, message, waited, second, exit_s = outcomes[rank].value
        assert kind in ("EpcommPeerError", "EpcommTimeoutError"), outcomes[rank]
        assert f"epcomm {op}" in message or "epcomm combine" in message, message
        assert f"no heartbeat: rank {VICTIM} " in message, message
        assert waited < 10 + 5, f"rank {rank} took {waited:.1f} s to notice"
        assert "process group failed earlier" in second, second
        assert exit_s < 10, f"rank {rank} took {exit_s:.1f} s to shut down"


SIM_CASE = Case(num_nodes=1, nvl=4, tokens=(20, 14, 9, 17), seed=4)


def die_in_sim_kernel(rank, world, kernel, timeout_s):
    """Rank VICTIM kills itself (SIGKILL) as it is about to run ``kernel``: its peers wait in the kernel."""
    from epcomm.backends.sim_backend import SimBackend

    if rank == VICTIM:
        original = SimBackend.run_kernel

        def run_or_die(self, name, *args, **kwargs):
            if name == kernel:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, name, *args, **kwargs)

        SimBackend.run_kernel = run_or_die
    buf = epcomm.Buffer(None, backend="sim", num_nvl_ranks=SIM_CASE.nvl, timeout_s=timeout_s)
    inp = make_input(SIM_CASE, rank)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx, SIM_CASE.num_experts)
    start = time.monotonic()
    try:
        recv_x, _, _, _, handle, _ = buf.dispatch(inp.x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                  num_tokens_per_expert=per_expert, topk_idx=inp.topk_idx)
        buf.combine(recv_x, handle)
    except epcomm.EpcommError as err:
        waited = time.monotonic() - start
        try:
            buf.dispatch(inp.x, handle=handle) if "handle" in locals() else buf.combine(inp.x, None)
        except epcomm.EpcommError as again:
            second = str(again)
        exit_start = time.monotonic()
        dist.destroy_process_group()
        return type(err).__name__, str(err), waited, second, time.monotonic() - exit_start
    return ("no error", None, None, None, None)


@pytest.mark.parametrize("kernel,op", [("intranode_dispatch", "dispatch"), ("intranode_combine", "combine")])
def test_sim_rank_killed_before_a_kernel_is_named(pools, kernel, op):
    """The survivors' kernels stop waiting at the timeout; the error names the kernel and the dead rank."""
    pool = pools(4)
    try:
        outcomes = pool.run_outcomes(die_in_sim_kernel, kernel, 4.0, timeout=60)
    finally:
        pool.close()
    assert outcomes[VICTIM].error_type == "died"
    for rank in range(4):
        if rank == VICTIM:
            continue
        kind, message, waited, second, exit_s = outcomes[rank].value
        assert kind in ("EpcommPeerError", "EpcommTimeoutError"), outcomes[rank]
        assert f"epcomm {op}: stage 'kernel {kernel}' on rank {rank}" in message, message
        assert f"no heartbeat: rank {VICTIM} " in message, message
        assert f"{kernel} " in message and ("timeout" in message or "peer_aborted" in message), message
        assert waited < 4 + 5, f"rank {rank} took {waited:.1f} s to notice"
        assert "process group failed earlier" in second, second
        assert exit_s < 10, f"rank {rank} took {exit_s:.1f} s to shut down"
