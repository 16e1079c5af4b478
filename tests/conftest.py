import pytest
import torch
from process_group_pool import ProcessGroupPool


class Pools:
    """One persistent process-group pool per world size, started on first use."""

    def __init__(self):
        self._pools: dict[int, ProcessGroupPool] = {}

    def __call__(self, world_size: int) -> ProcessGroupPool:
        if world_size not in self._pools:
            self._pools[world_size] = ProcessGroupPool(world_size)
        return self._pools[world_size]

    def close(self):
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="session")
def pools():
    created = Pools()
    yield created
    created.close()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
