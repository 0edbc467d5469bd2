"""Timing for the benchmarks: wall clock on CPU, CUDA events (+ L2 flush, kernel-only) on GPUs.

Every measurement starts from a barrier, so all ranks begin together; the
benchmark then takes, per repetition, the slowest rank's time (an all-reduce
MAX after the loop, so no extra collective runs inside the timed region).

The GPU code paths (CudaTimer, kernel_only_seconds, nvlink_ceiling) cannot run
on the project's CPU-only machines; they are written to be correct and are
only entered when ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist


class CpuTimer:
    """Barrier, then wall-clock time of ``fn()`` on this rank."""

    kind = "wall clock (time.perf_counter), barrier before each repetition"

    def __init__(self, group=None) -> None:
        self.group = group

    def __call__(self, fn: Callable[[], object]) -> float:
        dist.barrier(group=self.group)
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


class CudaTimer:
    """L2 flush, barrier, then CUDA-event time of ``fn()`` on the current stream.

    The flush writes a buffer twice the size of the L2 cache so no repetition
    finds the previous one's data cached. The events bracket everything ``fn``
    enqueues on the current stream (kernels, and any time the stream waits for
    the host, e.g. a split-size ``.tolist()``); see :func:`kernel_only_seconds`
    for the sum of kernel durations alone.
    """

    kind = "CUDA events, L2 flushed and barrier before each repetition"

    def __init__(self, device: torch.device, group=None) -> None:
        self.group = group
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0) or 64 * 2**20
        self.flush_buf = torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], object]) -> float:
        self.flush_buf.zero_()
        torch.cuda.synchronize()
        dist.barrier(group=self.group)
        torch.cuda.synchronize()  # NCCL's barrier is a kernel: let it finish before starting the clock
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


def make_timer(device: torch.device):
    return CudaTimer(device) if device.type == "cuda" else CpuTimer()


def kernel_only_seconds(fn: Callable[[], object], reps: int, device: torch.device) -> float | None:
    """Median per-repetition sum of the CUDA kernel durations ``fn`` launches (GPU only).

    Uses the PyTorch profiler (CUPTI). Kernels on different streams that
    overlap are summed, so this is kernel *work*, an upper bound on the
    kernels' share of the wall time; host gaps and stream waits are excluded.
    Returns None on CPU or if the profiler cannot trace kernels.
    """
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    per_rep = []
    try:
        for _ in range(reps):
            torch.cuda.synchronize()
            dist.barrier()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            total_us = 0.0
            for evt in prof.events():
                if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
                    total_us += getattr(evt, "device_time", 0.0) or 0.0
            per_rep.append(total_us * 1e-6)
    except Exception:  # profiler unavailable (no CUPTI): report nothing rather than a wrong figure
        return None
    per_rep.sort()
    return per_rep[len(per_rep) // 2] if per_rep else None


def nvlink_ceiling(nvl: int, device: torch.device, nbytes: int = 256 * 2**20, reps: int = 5) -> dict | None:
    """Measure once: a bare all_to_all_single among each node's ranks (NVLink only), GB/s per GPU.

    Every rank sends ``nbytes`` split evenly over its node's ranks. Bandwidth
    counts the bytes that leave the GPU (``nbytes * (nvl - 1) / nvl``). Also,
    when this process sees two GPUs with peer access, a direct device-to-device
    copy. GPU only; None on CPU.
    """
    if device.type != "cuda" or nvl < 2:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group(list(range(n * nvl, (n + 1) * nvl))) for n in range(world // nvl)]  # all ranks call all
    group = groups[rank // nvl]
    per_peer = nbytes // nvl
    send = torch.empty(per_peer * nvl, dtype=torch.uint8, device=device).fill_(1)
    recv = torch.empty_like(send)
    timer = CudaTimer(device, group=group)
    dist.all_to_all_single(recv, send, group=group)  # warm-up (NCCL connects)
    times = sorted(timer(lambda: dist.all_to_all_single(recv, send, group=group)) for _ in range(reps))
    t = torch.tensor([times[len(times) // 2]], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    result = {"node_all_to_all_GBps_per_gpu": per_peer * (nvl - 1) / float(t) / 1e9, "bytes_per_rank": nbytes}
    if torch.cuda.device_count() > 1:
        here = device.index if device.index is not None else torch.cuda.current_device()
        peer = (here + 1) % torch.cuda.device_count()
        if torch.cuda.can_device_access_peer(here, peer):
            src = torch.empty(nbytes, dtype=torch.uint8, device=device)
            dst = torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", peer))
            dst.copy_(src)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            result["peer_copy_GBps"] = nbytes * reps / (start.elapsed_time(end) / 1e3) / 1e9
    for g in groups:
        dist.destroy_process_group(g)
    return result
