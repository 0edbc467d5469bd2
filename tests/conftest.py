import os

import pytest
from hypothesis import settings

from rankpool import RankPool

# CI replays a fixed set of examples (no unrelated red builds); local runs explore.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

_pools: dict[int, RankPool] = {}


@pytest.fixture(scope="session")
def pools():
    """``pools(world_size)`` -> a shared RankPool (recreated if a test broke it)."""

    def get(world_size: int) -> RankPool:
        pool = _pools.get(world_size)
        if pool is None or pool.broken:
            pool = _pools[world_size] = RankPool(world_size)
        return pool

    yield get
    for pool in _pools.values():
        if not pool.broken:
            pool.close()
