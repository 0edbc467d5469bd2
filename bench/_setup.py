"""What every distributed bench does before measuring: give up alike on every rank, or start."""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch
import torch.distributed as dist

from epcomm.backends import resolve_backend
from epcomm.errors import EpcommBackendUnavailable
from epcomm.launch import init_distributed


def launcher_rank() -> int:
    """This process's rank as the launcher (mpiexec, torchrun) set it, before any process group exists."""
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def start_bench(backend: str, threads: int, nvl_ranks: int, experts: int,
                problem_of: Callable[[int, int], str | None] | None = None) -> tuple[int, int, torch.device] | None:
    """Resolve ``backend`` (unavailable: every rank gives up before a process group exists, nothing to hang
    on), set the CPU threads, start the process group and check the shape on every rank alike:
    ``nvl_ranks`` must divide the ranks and the ranks ``experts``; ``problem_of(rank, world)`` may add a
    bench's own check. Returns (rank, world, device), or None after rank 0 printed the reason (exit 2)."""
    try:
        resolve_backend(backend)
    except EpcommBackendUnavailable as err:
        if launcher_rank() == 0:
            print(f"bench: {err}", file=sys.stderr)
        return None
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
    rank, world = init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if world % nvl_ranks:
        problem = f"--nvl-ranks {nvl_ranks} must divide the number of ranks {world}"
    elif experts % world:
        problem = f"--experts {experts} must be a multiple of the number of ranks {world}"
    else:
        problem = problem_of(rank, world) if problem_of is not None else None
    if problem:
        if rank == 0:
            print(f"bench: {problem}", file=sys.stderr)
        dist.destroy_process_group()
        return None
    return rank, world, device
