import pytest

from rlsparse.lab.base import BaseConfig

# A base small and short enough for tests: hidden 32, 2 layers, 30 steps, no early-stop evals.
TINY = BaseConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, steps=30, batch_size=32,
                  target_accuracy=1.0, n_test=40)


@pytest.fixture(scope="session")
def tiny_config():
    return TINY


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    from rlsparse.lab.base import ensure_base

    return ensure_base(TINY, cache_dir=tmp_path_factory.mktemp("lab-cache"))
