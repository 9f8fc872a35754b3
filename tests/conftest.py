import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def random_ids():
    def make(n: int, length: int, seed: int = 0, vocab: int = 96):
        g = torch.Generator().manual_seed(seed)
        return [{"input_ids": torch.randint(3, vocab, (length,), generator=g).tolist()} for _ in range(n)]

    return make
