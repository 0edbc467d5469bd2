import pytest

from rankpool import RankPool

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
