"""The device runtime (csrc/runtime) and the sim backend's set-up, on forked gloo ranks.

Handles are exchanged and peers mapped; plain stores before the peer barrier are visible to every
peer after it; release/acquire handshakes work across processes through the shared mappings; a
rank that skips the barrier is named by the others; nothing is left in /dev/shm after a normal
exit or after a rank is SIGKILLed (during set-up or after it); the cuda runtime fails clearly
without a GPU.
"""

from __future__ import annotations

import glob
import importlib
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

import epcomm
from epcomm._comm import GroupComm
from epcomm._ext import load_extension
from epcomm.backends.sim_backend import SimRuntime
from epcomm.topology import Topology
from epcomm.traffic import TrafficStats

NVL_BYTES = 1 << 16
_kept_alive = []  # runtimes a test leaves open on purpose until the process exits


def _backend(rank, world, timeout_s=10.0, num_nvl_ranks=None, kind=SimRuntime):
    topo = Topology(world, rank, num_nvl_ranks or world)
    comm = GroupComm(dist.group.WORLD, topo, timeout_s, TrafficStats())
    return kind(comm, topo, NVL_BYTES)


def _leftover_segments(token):
    return sorted(glob.glob(f"/dev/shm/epcomm-{token}-*"))


# ---------------------------------------------------------------- handles, peer memory, barrier
def exchange_write_read(rank, world, rounds):
    sim = _backend(rank, world)
    try:
        sim.barrier()  # every rank has unlinked its segment name by now
        leftover = _leftover_segments(sim.run_token)
        pointers = sim.peer_pointers
        mine = sim.peer_view(rank, torch.int64, count=1024)
        wrong = 0
        latencies = []
        for round_idx in range(rounds):
            mine.copy_(torch.arange(1024) + rank * 100_000 + round_idx)  # plain stores ...
            start = time.perf_counter()
            sim.barrier()  # ... published by the barrier's release/acquire
            latencies.append(time.perf_counter() - start)
            for peer in range(world):
                expected = torch.arange(1024) + peer * 100_000 + round_idx
                wrong += int((sim.peer_view(peer, torch.int64, count=1024) != expected).sum())
            sim.barrier()  # nobody overwrites before everyone read
        return dict(token=sim.run_token, leftover=leftover, pointers=pointers, wrong=wrong,
                    median_ms=sorted(latencies)[len(latencies) // 2] * 1e3, kernels=sim.registered_kernels())
    finally:
        sim.close()


@pytest.mark.parametrize("world", [2, 4, 8])
def test_handles_peer_memory_and_barrier(pools, world):
    results = pools(world).run(exchange_write_read, 10)
    tokens = {r["token"] for r in results}
    assert len(tokens) == 1, f"ranks disagree on the run token: {tokens}"
    for rank, r in enumerate(results):
        assert r["leftover"] == [], f"rank {rank}: segments still named after set-up: {r['leftover']}"
        assert len(set(r["pointers"])) == world, r["pointers"]
        assert r["wrong"] == 0, f"rank {rank} read {r['wrong']} stale values from peers after the barrier"
        assert "intranode_dispatch" in r["kernels"]
    assert _leftover_segments(tokens.pop()) == []
    print(f"\npeer_barrier median latency on {world} ranks: " +
          ", ".join(f"{r['median_ms']:.2f} ms" for r in results))


def handshake(rank, world, rounds):
    sim = _backend(rank, world)
    try:
        peer = 1 - rank
        start = time.perf_counter()
        mismatches = sim._ext.testing.shm_handshake(
            sim.peer_pointers[peer], sim.local_pointer, rounds, rank == 0, 10.0)
        elapsed = time.perf_counter() - start
        sim.barrier()
        return mismatches, elapsed
    finally:
        sim.close()


def test_cross_process_acquire_release(pools):
    rounds = 20_000
    results = pools(2).run(handshake, rounds)
    for rank, (mismatches, _) in enumerate(results):
        assert mismatches == 0, f"rank {rank} saw {mismatches} payload words not yet written after acquiring the flag"
    print(f"\nshm round trip: {results[0][1] / rounds * 1e6:.2f} us")


# ---------------------------------------------------------------- barrier timeout
def barrier_with_one_absent(rank, world, absent, timeout_s):
    sim = _backend(rank, world)
    try:
        if rank == absent:
            return None
        start = time.perf_counter()
        try:
            sim.barrier(timeout_s=timeout_s)
        except epcomm.EpcommTimeoutError as err:
            return str(err), time.perf_counter() - start
        return "no error", time.perf_counter() - start
    finally:
        sim.close()


def test_barrier_timeout_names_the_missing_peer(pools):
    world, absent, timeout_s = 4, 2, 1.0
    results = pools(world).run(barrier_with_one_absent, absent, timeout_s)
    for rank, result in enumerate(results):
        if rank == absent:
            continue
        message, waited = result
        assert message.startswith(f"epcomm peer_barrier on rank {rank}: peer rank {absent} (at barrier 0) "
                                  f"did not arrive at barrier 1 within 1 s"), message
        assert "1 of 4 ranks missing" in message, message
        assert timeout_s <= waited < timeout_s + 3, f"rank {rank} waited {waited:.2f} s"


# ---------------------------------------------------------------- /dev/shm leaks
def set_up_and_exit(rank, world):
    sim = _backend(rank, world)
    sim.barrier()
    _kept_alive.append(sim)  # still mapped when the process exits: no close()
    return sim.run_token


def test_no_segments_left_after_exit(pools):
    pool = pools(4)
    tokens = set(pool.run(set_up_and_exit))
    pool.close()  # the ranks exit with their runtimes open
    assert len(tokens) == 1
    assert _leftover_segments(tokens.pop()) == []


VICTIM = 3


def killed_during(rank, world, stage):
    """Rank VICTIM SIGKILLs itself on entering `stage` of the set-up ("after set-up": once it is done)."""
    if rank == VICTIM and stage != "after set-up":
        original = GroupComm._run

        def run_or_die(self, op, stage_, start):
            if stage_ == stage:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, op, stage_, start)

        GroupComm._run = run_or_die
    observed = {}
    original_gather = SimRuntime._gather_bytes

    def remember_token(self, stage_, payload, size):  # the token, even if set-up fails later
        rows = original_gather(self, stage_, payload, size)
        observed.setdefault("token", rows[0].hex() if stage_ == "agree run token" else None)
        return rows

    SimRuntime._gather_bytes = remember_token
    try:
        sim = _backend(rank, world, timeout_s=2.0)
    except epcomm.EpcommError as err:
        return observed.get("token"), type(err).__name__, str(err)
    finally:
        SimRuntime._gather_bytes = original_gather
    if rank == VICTIM:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        sim.barrier(timeout_s=2.0)
    except epcomm.EpcommError as err:
        return sim.run_token, type(err).__name__, str(err)
    finally:
        sim.close()
    return sim.run_token, "no error", None


@pytest.mark.parametrize("stage", ["exchange handles", "open peers", "after set-up"])
def test_no_segments_left_after_sigkill(pools, stage):
    pool = pools(4)
    try:
        outcomes = pool.run_outcomes(killed_during, stage, timeout=60)
    finally:
        pool.close()
    assert outcomes[VICTIM].error_type == "died"
    survivors = [o.value for o in outcomes if o.rank != VICTIM]
    tokens = {token for token, _, _ in survivors}
    assert len(tokens) == 1 and None not in tokens, survivors
    for token, kind, message in survivors:
        assert kind in ("EpcommPeerError", "EpcommTimeoutError"), (kind, message)
        if stage == "after set-up":
            assert f"peer rank {VICTIM} " in message, message
        else:
            assert f"stage '{stage}'" in message and f"no heartbeat: rank {VICTIM} " in message, message
    assert _leftover_segments(tokens.pop()) == [], "a killed rank's shared memory segment leaked"


# ---------------------------------------------------------------- unavailable configurations
def multi_node(rank, world):
    """Across emulated nodes every rank maps every rank's buffer (the NVL region of its node's ranks and
    the RDMA region of all ranks live in one segment per rank)."""
    sim = _backend(rank, world, num_nvl_ranks=2)
    try:
        sim.barrier()
        return len(sim.peer_pointers), len(set(sim.peer_pointers))
    finally:
        sim.close()


def test_sim_runtime_maps_every_rank_across_nodes(pools):
    assert pools(4).run(multi_node) == [(4, 4)] * 4


def cuda_without_gpu(rank, world):
    from epcomm.backends.cuda_backend import CudaRuntime

    if torch.cuda.is_available():
        return "has a GPU"
    try:
        _backend(rank, world, kind=CudaRuntime)
    except epcomm.EpcommBackendUnavailable as err:
        return str(err)
    return "no error"


def test_cuda_runtime_without_gpu_is_a_clear_error(pools):
    try:
        load_extension("cuda")
    except epcomm.EpcommBackendUnavailable as err:
        pytest.skip(f"the cuda extension is not built here: {err}")
    results = pools(2).run(cuda_without_gpu)
    if "has a GPU" in results:
        pytest.skip("this machine has a GPU")
    for message in results:
        assert "no CUDA GPU/driver on this machine: use backend='sim' or 'torch'" in message, message


def test_cuda_extension_carries_the_intranode_internode_and_low_latency_kernels():
    """The cuda build has the cpu build's intranode kernel entries and, when NCCL's headers were there at
    build time (GIN_BUILT), its internode and low-latency ones over GIN (compiled for sm_90 and sm_100 by
    setup.py)."""
    try:
        ext = load_extension("cuda")
    except epcomm.EpcommBackendUnavailable as err:
        pytest.skip(f"the cuda extension is not built here: {err}")
    skipped = () if ext.GIN_BUILT else ("internode_", "low_latency_")
    cpu = {name for name in load_extension("cpu").registered_kernels() if not name.startswith(skipped)}
    assert set(ext.registered_kernels()) == cpu


def cuda_buffer_without_gpu(rank, world):
    try:
        epcomm.Buffer(None, backend="cuda", num_nvl_ranks=world)
    except epcomm.EpcommBackendUnavailable as err:
        return str(err)
    return "no error"


def cuda_buffer_on_nodes(rank, world, num_nvl_ranks):
    try:
        epcomm.Buffer(None, backend="cuda", num_nvl_ranks=num_nvl_ranks)
    except epcomm.EpcommBackendUnavailable as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - the test says which error it was
        return f"{type(err).__name__}: {err}"
    return "no error"


@pytest.mark.parametrize("num_nvl_ranks", [2, 4], ids=["2x2", "1x4"])
def test_cuda_backend_takes_multi_node_groups_and_names_the_missing_gpu(pools, num_nvl_ranks):
    """Across nodes too (the two-hop kernels over CUDA IPC + NCCL GIN), a machine without a GPU makes every
    rank raise EpcommBackendUnavailable naming the missing GPU, not a refusal of the group's shape."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for message in pools(4).run(cuda_buffer_on_nodes, num_nvl_ranks):
        assert "backend 'cuda' is unavailable on 4 of 4 ranks" in message, message
        assert all(f"rank {r}: torch.cuda.is_available() is False" in message for r in range(4)), message
        assert "intranode-only" not in message, message


def test_cuda_backend_without_gpu_fails_on_every_rank(pools):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for message in pools(2).run(cuda_buffer_without_gpu):
        assert "backend 'cuda' is unavailable on 2 of 2 ranks" in message and "rank 0: torch.cuda.is_available() is False" in message
        assert "rank 1:" in message and "backend='sim'" in message and "backend='torch'" in message, message


def test_missing_extension_is_a_clear_error(monkeypatch):
    def no_module(name, *args, **kwargs):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", no_module)
    with pytest.raises(epcomm.EpcommBackendUnavailable, match=r"epcomm\._C cannot be loaded.*pip install --no-build-isolation -e \."):
        load_extension("cpu")


def test_runtime_rejects_misuse():
    ext = load_extension("cpu")
    runtime = ext.DeviceRuntime(0, 1, os.urandom(4).hex())
    with pytest.raises(ValueError, match="call allocate"):
        runtime.barrier(1.0)
    runtime.allocate(4096)
    with pytest.raises(ValueError, match="a handle is 128 bytes, got 3"):
        runtime.open_peers([b"abc"])
    runtime.open_peers([runtime.export_handle()])
    runtime.release_names()
    assert list(ext.registered_kernels()) == ["internode_combine", "internode_dispatch", "internode_notify",
                                              "intranode_combine", "intranode_dispatch", "intranode_notify",
                                              "low_latency_combine_recv", "low_latency_combine_send",
                                              "low_latency_dispatch_recv", "low_latency_dispatch_send",
                                              "low_latency_reset_signals"]
    config = ext.KernelConfig(num_channels=2, nvl_chunk_send_tokens=6, nvl_ring_tokens=32)
    spec = ext.IntranodeSpec(config=config, workspace=ext.NvlWorkspaceShape(
        num_ranks=1, num_local_experts=0, num_topk=8, max_row_bytes=1 << 20))
    barrier = dict(exchange_counts=False, is_token_in_rank=None, num_tokens_per_expert=None, num_tokens=0,
                   expert_alignment=1, recv_rank_prefix=None, recv_channel_prefix_matrix=None,
                   num_recv_tokens_per_expert=None, call_digest=0, call_flags=-1, call_agreed=None,
                   call_mismatch=None)
    with pytest.raises(TypeError, match="NotifyParams needs every field by name; missing: num_tokens"):
        ext.NotifyParams(**{k: v for k, v in barrier.items() if k != "num_tokens"})
    with pytest.raises(TypeError, match="NotifyParams has no field 'epoch'"):  # counted on the device (epoch.cuh)
        ext.NotifyParams(**barrier, epoch=1)
    with pytest.raises(TypeError):  # a spec of the other path: no kernel takes this pair
        runtime.run(spec, ext.InternodeNotifyParams(**barrier, forward_channel_prefix_matrix=None, reset_signals=False), 1.0)
    with pytest.raises(ValueError, match="epcomm intranode_notify: the kernels need a .*-byte NVL buffer, "
                                         "this one has 4096 bytes"):
        runtime.run(spec, ext.NotifyParams(**barrier), 1.0)
    spec.workspace = ext.NvlWorkspaceShape(num_ranks=2, num_local_experts=0, num_topk=8, max_row_bytes=64)
    with pytest.raises(ValueError, match="spec.workspace.num_ranks=2 but the runtime has 1 ranks"):
        runtime.run(spec, ext.NotifyParams(**barrier), 1.0)
    rdma = ext.RdmaWorkspaceShape(num_nodes=2, num_nvl_ranks=1, num_local_experts=0, num_topk=8, max_row_bytes=64,
                                  hidden=32, max_nodes_per_token=2)
    internode = ext.InternodeSpec(config=ext.InternodeConfig(nvl=config, rdma_chunk_tokens=2, rdma_ring_tokens=8),
                                  workspace=rdma, nvl_max_row_bytes=64, rdma_offset=4096)
    with pytest.raises(ValueError, match="spec.workspace has 2 nodes x 1 ranks but the runtime has 1 ranks"):
        runtime.run(internode, ext.InternodeNotifyParams(**barrier, forward_channel_prefix_matrix=None, reset_signals=False), 1.0)
    # sizing refuses what the kernels would refuse, naming the rule
    bad = ext.KernelConfig(num_channels=2, nvl_chunk_send_tokens=8, nvl_ring_tokens=4)
    with pytest.raises(ValueError, match="intranode kernels: nvl_ring_tokens must be >= nvl_chunk_send_tokens"):
        ext.workspace_bytes(ext.IntranodeSpec(config=bad, workspace=spec.workspace))
    internode.config = ext.InternodeConfig(nvl=config, rdma_chunk_tokens=4, rdma_ring_tokens=2)
    with pytest.raises(ValueError, match="internode kernels: .*rdma_ring_tokens"):
        ext.workspace_bytes(internode)
    runtime.barrier(1.0)
    runtime.close()
    with pytest.raises(ValueError, match="DeviceRuntime|num_ranks"):
        ext.DeviceRuntime(0, 0, "ab")


# ---------------------------------------------------------------- teardown order
def collective_teardown(rank, world):
    """close_peers drops the peers' mappings but keeps this rank's buffer; the collective close frees it
    only after every rank closed its mappings (the host meeting between); abandon is the non-collective path."""
    sim = _backend(rank, world)
    runtime = sim.runtime
    runtime.close_peers()
    import ctypes

    own = torch.frombuffer((ctypes.c_char * 128).from_address(sim.local_pointer), dtype=torch.int64)  # still mapped
    own.fill_(rank)
    peers_gone = False
    try:
        runtime.peer_ptrs  # the peers' mappings are gone: asking for them is an error
    except (RuntimeError, ValueError):
        peers_gone = True
    kept = int(own.sum())
    sim._runtime = runtime  # (close() below runs the whole protocol; close_peers again is a no-op)
    sim.close(collective=True, op="teardown test")
    second = _backend(rank, world)
    second.close()  # abandon: no peer meeting, nothing freed that a peer may map (cpu: unmapped)
    return peers_gone, kept, sim._runtime is None and second._runtime is None


def test_collective_teardown_closes_peers_before_freeing(pools):
    for rank, (peers_gone, kept, closed) in enumerate(pools(2).run(collective_teardown)):
        assert peers_gone and kept == 16 * rank and closed


# ---------------------------------------------------------------- enqueue-only kernels
def _notify_barrier(ext, world):
    """A notify that only meets the peers (no counts): the smallest kernel that waits on every rank (each run
    one epoch further, counted on the device)."""
    config = ext.KernelConfig(num_channels=2, nvl_chunk_send_tokens=6, nvl_ring_tokens=32)
    spec = ext.IntranodeSpec(config=config, workspace=ext.NvlWorkspaceShape(
        num_ranks=world, num_local_experts=0, num_topk=8, max_row_bytes=64))
    params = ext.NotifyParams(exchange_counts=False, is_token_in_rank=None, num_tokens_per_expert=None,
                              num_tokens=0, expert_alignment=1, recv_rank_prefix=None, recv_channel_prefix_matrix=None,
                              num_recv_tokens_per_expert=None, call_digest=0, call_flags=-1, call_agreed=None,
                              call_mismatch=None)
    return spec, params


def enqueue_with_one_absent(rank, world, absent):
    sim = _backend(rank, world)
    try:
        sim.barrier()
        if rank == absent:
            return None
        runtime, ext = sim.runtime, sim._ext
        spec, params = _notify_barrier(ext, world)
        runtime.run(spec, params, 0.5, 0, True)  # issued; its timeout is in its error slot, not raised here
        pending_after_launch = runtime.num_pending
        try:
            runtime.check_pending(False)
            reported = "no error"
        except epcomm.EpcommTimeoutError as err:
            reported = str(err)
        pending_after_report = runtime.num_pending
        # an unreported failure reaches the runtime's next call, before that call launches anything
        runtime.run(spec, params, 0.5, 0, True)
        try:
            runtime.barrier(0.5)
            next_call = "no error"
        except epcomm.EpcommError as err:  # the first kernel's abort flag: this one saw it ("peer_aborted")
            next_call = str(err)
        return pending_after_launch, reported, pending_after_report, next_call, runtime.num_pending
    finally:
        sim.close()


def enqueue_and_wait(rank, world, rounds):
    sim = _backend(rank, world)
    try:
        sim.barrier()
        runtime, ext = sim.runtime, sim._ext
        spec, params = _notify_barrier(ext, world)
        for _ in range(rounds):
            runtime.run(spec, params, 10.0, 0, True)
        pending = runtime.num_pending
        runtime.check_pending(True)
        return pending, runtime.num_pending
    finally:
        sim.close()


def test_enqueued_kernels_report_at_check_pending_or_the_next_call(pools):
    """enqueue_only: the call returns once the kernel is issued; its error slot is read by check_pending
    (or the runtime's next call, which raises it before launching), once, naming the kernel and rank."""
    world, absent = 2, 1
    results = pools(world).run(enqueue_with_one_absent, absent)
    pending_after_launch, reported, pending_after_report, next_call, pending_at_end = results[0]
    assert pending_after_launch == 1
    assert reported.startswith("epcomm intranode_notify on rank 0: "), reported
    assert "notify timeout" in reported and "peer=1" in reported, reported  # its error slot: role and peer
    assert pending_after_report == 0
    assert next_call.startswith("epcomm intranode_notify on rank 0: "), next_call  # not the barrier's own timeout
    assert pending_at_end == 0
    assert results[absent] is None


def test_enqueued_kernels_that_succeed_leave_nothing_pending(pools):
    # each call first reports the enqueued kernels that have finished (on the cpu runtime: all of them), so
    # one stays pending until check_pending; none after it
    assert pools(2).run(enqueue_and_wait, 3) == [(1, 0), (1, 0)]
