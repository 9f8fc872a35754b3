"""The lora and full baselines: identity at init, what trains, round trips, merged export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compose import Composer
from compose.export import export_plain
from compose.strategies import merge_and_export
from compose.testing import tiny_model

FAMILIES = ["llama", "gpt2", "gpt_neox", "mixtral"]


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(seed))


def _data(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, 96, (24,), generator=g).tolist()} for _ in range(n)]


FIT = dict(max_steps=2, batch_size=2, seq_len=16, learning_rate=1e-2, warmup_ratio=0.0, progress=False, report_to=None)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_identity_at_init(family):
    anchor = tiny_model(family)
    c = Composer(anchor, strategy="lora", r=4)
    ids = _ids()
    assert torch.equal(_logits(c.model, ids), _logits(anchor, ids))


def test_lora_trains_only_adapters_and_keeps_anchor():
    anchor = tiny_model("llama")
    before = {n: p.clone() for n, p in anchor.named_parameters()}
    c = Composer(anchor, strategy="lora", r=4, alpha=8)
    trainable = c.trainable_parameters()
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    start = {n: p.detach().clone() for n, p in c.model.named_parameters()}
    c.fit(_data(), **FIT)
    after = dict(c.model.named_parameters())
    changed = {n for n in start if not torch.equal(start[n], after[n].detach())}
    assert changed and changed <= set(trainable)
    assert any("lora_B" in n for n in changed)
    # the caller's model is untouched
    assert all(torch.equal(before[n], p) for n, p in anchor.named_parameters())


def test_lora_options_are_validated():
    with pytest.raises(ValueError, match="rank"):
        Composer(tiny_model("llama"), strategy="lora", rank=4)
    with pytest.raises(ValueError, match="bias"):
        Composer(tiny_model("llama"), strategy="lora", bias="some")


def test_lora_round_trip_and_merged_export(tmp_path):
    anchor = tiny_model("llama")
    c = Composer(anchor, strategy="lora", r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    c.fit(_data(), **FIT)
    ids = _ids(2)
    ref = _logits(c.model, ids)
    c.save(tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "model.safetensors").exists()  # only what was trained
    loaded = Composer.load(tmp_path / "out", anchor=anchor)
    assert torch.equal(_logits(loaded.model, ids), ref)
    merge_and_export(c, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(plain, ids), ref, atol=1e-5, rtol=1e-5)
    # the Composer still holds its adapters after the export
    assert type(c.model).__name__.startswith("Peft")
    assert torch.equal(_logits(c.model, ids), ref)


def test_full_trains_everything_and_round_trips(tmp_path):
    anchor = tiny_model("qwen2")
    c = Composer(anchor, strategy="full")
    assert len(c.trainable_parameters()) == len(list(c.model.parameters()))
    start = {n: p.detach().clone() for n, p in c.model.named_parameters()}
    c.fit(_data(), **FIT)
    changed = [n for n, p in c.model.named_parameters() if not torch.equal(start[n], p.detach())]
    assert len(changed) == len(start)
    ids = _ids(3)
    ref = _logits(c.model, ids)
    c.save(tmp_path / "out")
    assert torch.equal(_logits(Composer.load(tmp_path / "out").model, ids), ref)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), ids), ref)
    export_plain(c, tmp_path / "plain")
    assert not (tmp_path / "plain" / "compose.json").exists()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "plain"), ids), ref)


def test_full_can_freeze_embeddings():
    c = Composer(tiny_model("llama"), strategy="full", train_embeddings=False)
    frozen = {n for n, p in c.model.named_parameters() if not p.requires_grad}
    assert frozen and all("embed_tokens" in n or "lm_head" in n for n in frozen)


@pytest.mark.parametrize("strategy,options", [("lora", {"r": 2}), ("full", {})])
def test_baselines_generate_like_forward(strategy, options):
    c = Composer(tiny_model("llama"), strategy=strategy, **options)
    ids = _ids(4)[:1]
    out = c.generate(ids, max_new_tokens=5, do_sample=False)
    seq = ids
    for _ in range(5):
        nxt = _logits(c.model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_full_blocks_trains_only_the_named_blocks(tmp_path):
    """The LLaMA Pro ablation "train the blocks it would copy, no new ones" (freeze tuning)."""
    from compose import arch

    anchor = tiny_model("llama", seed=1, layers=8)
    c = Composer(anchor, strategy="full", blocks="interleave:2")
    names = set(c.trainable_parameters())
    assert names and all(n.startswith(("model.layers.3.", "model.layers.7.")) for n in names)
    before = {k: v.clone() for k, v in c.model.state_dict().items()}
    ids = torch.randint(3, 96, (8, 20), generator=torch.Generator().manual_seed(0))
    c.fit(
        [{"input_ids": r} for r in ids.tolist()],
        max_steps=2,
        learning_rate=1e-2,
        batch_size=4,
        seq_len=16,
        progress=False,
    )
    after = c.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.3.", "model.layers.7.")) for k in changed)
    out = c.save(tmp_path / "out")
    again = Composer.load(out)
    assert set(again.trainable_parameters()) == names
    assert len(arch.get_blocks(again.model)) == 8
    with pytest.raises(ValueError, match=r"blocks \[8\] are out of range"):
        Composer(anchor, strategy="full", blocks=[8])
    with pytest.raises(ValueError, match="'interleave:N'"):
        Composer(anchor, strategy="full", blocks="top:2")
