"""Start torch.distributed from whatever launched this process: mpiexec or torchrun.

Benchmarks and examples call :func:`init_distributed` so the same script runs
under ``mpiexec -n 8 python ...`` (mpi4py bootstraps the rendezvous) and under
``torchrun --nproc-per-node 8 ...``; :func:`parse_settings` gives a settings
dataclass its command line; :func:`run_example` is the start the CPU examples share.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import socket
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "parse_settings", "run_example"]

SettingsT = TypeVar("SettingsT")
ResultT = TypeVar("ResultT")


def parse_settings(settings_class: type[SettingsT], argv: list[str] | None, description: str) -> SettingsT:
    """``settings_class`` (a dataclass of int, float, str and bool fields with defaults) from ``argv``:
    field ``some_name`` is ``--some-name``; a bool field takes ``--some-name`` / ``--no-some-name``."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(settings_class):
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    return settings_class(**vars(parser.parse_args(argv)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialise the default process group; returns ``(rank, world_size)``.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available, else gloo.
        timeout_s: the process group's own timeout (epcomm buffers have their own, shorter one).
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        init_method = "env://"
    else:
        try:
            from mpi4py import MPI
        except ImportError as err:
            raise RuntimeError("launch with torchrun, or with mpiexec after `pip install mpi4py mpich`") from err
        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        address = comm.bcast((socket.gethostname(), _free_port()) if rank == 0 else None, root=0)
        init_method = f"tcp://{address[0]}:{address[1]}"
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("MPI_LOCALRANKID", rank)))
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)
    return rank, world


def run_example(name: str, run: Callable[[int, int], ResultT]) -> tuple[int, int, ResultT] | None:
    """The start the CPU examples share: one torch thread per rank, a gloo process group from the
    launcher, then ``run(rank, world_size)``. Returns ``(rank, world_size, result)``; the caller reports
    and calls ``dist.destroy_process_group()``. A backend that cannot run here is no failure of the
    example: rank 0 says so (``name: why``) and suggests the torch backend, the process group is
    destroyed and the result is None (exit status 2 by convention)."""
    from .errors import EpcommBackendUnavailable

    torch.set_num_threads(1)
    rank, world = init_distributed("gloo")
    try:
        return rank, world, run(rank, world)
    except EpcommBackendUnavailable as err:
        if rank == 0:
            print(f"{name}: {err}\nrerun with --backend torch (the backend this build ships)", file=sys.stderr)
        dist.destroy_process_group()
        return None
