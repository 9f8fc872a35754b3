"""CUDA checks (bf16 frozen models, autocast, fp32 master copies). Run with `pytest -m gpu` on a GPU machine.

Deselected by default (pyproject `addopts`); they were not run on the CPU-only dev machine.
"""

from __future__ import annotations

import pytest
import torch

from compose import Composer
from compose.testing import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FIT = dict(max_steps=3, learning_rate=1e-2, batch_size=2, seq_len=16, progress=False)


def data(n=8, length=40):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 96, (length,), generator=g).tolist()} for _ in range(n)]


def test_block_expand_bf16_on_cuda():
    c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=2, dtype="bfloat16")
    frozen = {k: v.clone() for k, v in c.model.state_dict().items() if k not in c.trainable_parameters()}
    c.fit(data(), **FIT)  # mixed_precision auto -> bf16
    assert next(c.model.parameters()).is_cuda
    assert all(p.dtype == torch.float32 for p in c.trainable_parameters().values())
    after = c.model.state_dict()
    assert all(torch.equal(v, after[k].to(v.device)) for k, v in frozen.items())
    out = c.generate(torch.randint(3, 96, (2, 5)), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)


def test_calm_bf16_on_cuda():
    anchor, augment = tiny_model("llama", hidden=48, heads=6), tiny_model("gpt2", seed=1)
    c = Composer(anchor, augment, strategy="calm", every=2, dtype="bfloat16")
    c.fit(data(), **FIT)
    x = torch.randint(3, 96, (2, 7))
    cached = c.generate(x, max_new_tokens=5, do_sample=False)
    assert cached.shape == (2, 12)
