import pytest
import torch

# The test models are tiny: one intra-op thread is as fast, and it cannot spin-wait against
# other processes on a shared 2-core machine (which made the suite ~6x slower there).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
