import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    # Tiny models: one thread is fastest and keeps tests stable on a 2-core CI machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
