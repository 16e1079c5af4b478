import pytest
import torch
from process_group_pool import ProcessGroupPool


class Pools:
    """One persistent process-group pool per (world size, device), started on first use."""

    def __init__(self):
        self._pools: dict[tuple[int, str], ProcessGroupPool] = {}

    def __call__(self, world_size: int, device: str = "cpu") -> ProcessGroupPool:
        key = (world_size, device)
        if key not in self._pools:
            self._pools[key] = ProcessGroupPool(world_size, device)
        return self._pools[key]

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
