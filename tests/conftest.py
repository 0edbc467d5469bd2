import os

import pytest
from hypothesis import settings

from backend_selection import one_gpu_per_rank, selected_backends
from rankpool import RankPool

# CI replays a fixed set of examples (no unrelated red builds); local runs explore.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

_pools: dict[int, RankPool] = {}


def pytest_configure(config):
    try:
        selected_backends()
    except ValueError as err:  # a misspelt EPCOMM_TEST_BACKENDS: say so, do not run everything
        raise pytest.UsageError(str(err)) from None


def pytest_report_header(config):
    selected = selected_backends()
    return f"EPCOMM_TEST_BACKENDS: {','.join(selected)} (only tests of these backends run)" if selected else None


def pytest_collection_modifyitems(config, items):
    """With EPCOMM_TEST_BACKENDS set, keep only the tests parametrized over one of its backends
    ("sim:1x4" counts as "sim"); tests without a backend parameter are deselected (CI runs them)."""
    selected = selected_backends()
    if not selected:
        return
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        backend = params.get("backend")
        (kept if isinstance(backend, str) and backend.split(":")[0] in selected else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def pools():
    """``pools(world_size)`` -> a shared RankPool (recreated if a test broke it). With the cuda backend
    selected, a pool has one GPU per rank: a test needing more ranks than GPUs is skipped."""

    def get(world_size: int) -> RankPool:
        if one_gpu_per_rank():
            import torch

            if world_size > torch.cuda.device_count():
                pytest.skip(f"{world_size} ranks need {world_size} GPUs (one per rank); "
                            f"this machine has {torch.cuda.device_count()}")
        pool = _pools.get(world_size)
        if pool is None or pool.broken:
            pool = _pools[world_size] = RankPool(world_size, one_gpu_per_rank=one_gpu_per_rank())
        return pool

    yield get
    for pool in _pools.values():
        if not pool.broken:
            pool.close()
