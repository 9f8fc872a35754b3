"""Inputs that used to train, score or save the wrong thing quietly: each is now an early error or a warning."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from compose import Composer
from compose.io import OutputError
from compose.testing import tiny_model, tiny_tokenizer
from compose.validation import OptionError

FIT = dict(max_steps=1, learning_rate=1e-2, batch_size=2, seq_len=8, progress=False, report_to=None)


def _ids(n: int = 4, length: int = 20) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 96, (length,), generator=g).tolist()} for _ in range(n)]


@pytest.fixture(scope="module")
def anchor():
    return tiny_model("llama", seed=0)


@pytest.fixture
def expand(anchor):
    return Composer(anchor, strategy="block_expand", num_blocks=1, tokenizer=tiny_tokenizer())


def test_batch_larger_than_the_dataset_says_so(expand):
    with pytest.warns(UserWarning, match=r"packs into 2 block\(s\).*fewer than one batch \(batch_size=4"):
        expand.fit(_ids(1, 12), **{**FIT, "batch_size": 4})


def test_save_every_without_output_dir_is_refused(expand):
    with pytest.raises(ValueError, match="save_every=1 writes checkpoints into output_dir, which is not set"):
        expand.fit(_ids(), save_every=1, **FIT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is real on a GPU")
def test_fp16_on_cpu_is_refused_before_training(expand, tmp_path):
    with pytest.raises(ValueError, match="mixed_precision='fp16' needs a CUDA GPU"):
        expand.fit(_ids(), mixed_precision="fp16", output_dir=str(tmp_path / "run"), **FIT)
    assert not (tmp_path / "run").exists()


def test_evaluate_beyond_the_position_limit_is_refused(expand):
    with pytest.raises(OptionError, match="seq_len=4096 is beyond the model's 128 positions"):
        expand.evaluate(_ids(), seq_len=4096)


def test_characters_the_tokenizer_maps_to_unk_are_named(expand):
    with pytest.warns(UserWarning, match=r"<unk>: it does not cover '好' '😀'"):
        expand.fit(["hello 好 world 😀 again and again"] * 4, **FIT)


def test_a_tokenizer_without_eos_does_not_pack_text(anchor):
    tok = tiny_tokenizer()
    tok.eos_token = None
    c = Composer(anchor, strategy="block_expand", num_blocks=1, tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer has no EOS token, so packing would join documents"):
        c.fit(["one document", "another one"] * 4, **FIT)
    c.fit(["one document", "another one"] * 4, packing=False, **FIT)  # each record alone: fine


def _bert():
    from transformers import BertConfig, BertLMHeadModel

    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return BertLMHeadModel(cfg)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=96, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
    return T5ForConditionalGeneration(cfg)


@pytest.mark.parametrize("make, match", [(_bert, "is an encoder: every token sees"), (_t5, "encoder-decoder")])
def test_encoders_are_not_trained_as_causal_lms(make, match):
    with pytest.raises(ValueError, match=match):
        Composer(make(), strategy="full")


def test_hand_edited_inserted_blocks_are_refused(expand, tmp_path):
    expand.save(tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "compose.json").read_text())
    good = meta["state"]["inserted"]
    meta["state"]["inserted"] = [0]
    assert good != [0]
    (tmp_path / "out" / "compose.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"lists inserted blocks \[0\].*the wrong blocks would train"):
        Composer.load(tmp_path / "out")


def test_in_memory_augment_tokenizer_assumption_is_said(anchor):
    with pytest.warns(UserWarning, match="augmenting model 0 has no tokenizer beside it.*augment_tokenizer="):
        Composer(anchor, tiny_model("llama", seed=1), strategy="calm", every=2, tokenizer=tiny_tokenizer())


def test_a_symlinked_save_directory_stays_a_link(expand, tmp_path):
    target = tmp_path / "disk" / "model"
    target.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(target)
    expand.save(link)
    expand.save(link)  # again: replaced inside the target
    assert link.is_symlink() and (target / "compose.json").is_file()
    Composer.load(link)


def test_a_read_only_directory_is_not_replaced(expand, tmp_path):
    d = expand.save(tmp_path / "out")
    before = sorted(p.name for p in d.iterdir())
    os.chmod(d, stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(OutputError, match="is read-only: compose will not replace it"):
            expand.save(d)
        assert sorted(p.name for p in d.iterdir()) == before
    finally:
        os.chmod(d, stat.S_IRWXU)


def test_a_read_only_final_stops_the_run_before_training(anchor, tmp_path):
    out = tmp_path / "run"
    Composer(anchor, strategy="block_expand", num_blocks=1).fit(_ids(), output_dir=str(out), **FIT)
    metrics = (out / "metrics.jsonl").read_bytes()
    os.chmod(out / "final", stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(OutputError, match="final model directory .* is read-only"):
            Composer(anchor, strategy="block_expand", num_blocks=1).fit(
                _ids(), output_dir=str(out), overwrite_output_dir=True, **FIT
            )
        assert (out / "metrics.jsonl").read_bytes() == metrics
    finally:
        os.chmod(out / "final", stat.S_IRWXU)


@pytest.fixture
def poisoned(anchor):
    c = Composer(anchor, strategy="block_expand", num_blocks=1)
    with torch.no_grad():
        c.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    return c


def test_nan_in_a_frozen_weight_is_named_by_fit(poisoned):
    with pytest.raises(ValueError, match=r"cannot train: the frozen .* model.layers.0.mlp.down_proj.weight holds NaN"):
        poisoned.fit(_ids(), **FIT)


def test_nan_in_a_frozen_weight_stops_generate_and_evaluate(poisoned):
    with pytest.raises(ValueError, match="cannot generate: .*down_proj.weight holds NaN"):
        poisoned.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="cannot evaluate: .*down_proj.weight holds NaN"):
        poisoned.evaluate(_ids(), seq_len=8)
