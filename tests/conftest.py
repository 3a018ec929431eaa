import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    # Tiny models: one thread is fastest and keeps tests stable on a 2-core CI machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need CUDA: skipped where there is none (CI)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
