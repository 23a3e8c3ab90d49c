import os

import pytest
import torch

# at most 2 threads per process, and the cores shared among pytest-xdist's workers: more threads
# than cores only make the workers wait on each other
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device this machine has: tests taking it run on CUDA too where there is one."""
    return torch.device(request.param)
