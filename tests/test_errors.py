"""Bad input ends in a clear error and leaves nothing half-written (issue 2)."""

from __future__ import annotations

import pytest
import torch

from compose import Composer
from compose.io import atomic_directory
from compose.testing import tiny_model

FIT = dict(max_steps=2, learning_rate=1e-2, batch_size=2, seq_len=16, progress=False)


@pytest.fixture(scope="module")
def anchor():
    return tiny_model("llama", seed=0)


def test_unknown_strategy_lists_known(anchor):
    with pytest.raises(ValueError, match=r"unknown strategy 'blok_expand'.*block_expand"):
        Composer(anchor, strategy="blok_expand", num_blocks=2)


def test_unknown_option_named(anchor):
    with pytest.raises(ValueError, match=r"unknown option.*'num_block'.*accepted: .*num_blocks"):
        Composer(anchor, strategy="block_expand", num_block=2)


@pytest.mark.parametrize("n", [0, -1, 1.5, None])
def test_num_blocks_must_be_positive(anchor, n):
    with pytest.raises(ValueError, match="num_blocks"):
        Composer(anchor, strategy="block_expand", num_blocks=n)


def test_bad_placement_name(anchor):
    with pytest.raises(ValueError, match="placement must be one of"):
        Composer(anchor, strategy="block_expand", num_blocks=2, placement="middle")


def test_positions_out_of_range(anchor):
    with pytest.raises(ValueError, match=r"out of range.*4 blocks.*0\.\.3"):
        Composer(anchor, strategy="block_expand", placement=[1, 4])


def test_unknown_family():
    from transformers import AutoModelForCausalLM, BloomConfig

    bloom = AutoModelForCausalLM.from_config(BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64))
    with pytest.raises(ValueError, match=r"'bloom' is not supported; supported families: .*gpt2.*llama"):
        Composer(bloom, strategy="block_expand", num_blocks=1)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Composer(str(tmp_path / "nope"), strategy="block_expand", num_blocks=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Composer(str(tmp_path / "empty"), strategy="block_expand", num_blocks=1)


def test_missing_data_file(anchor):
    c = Composer(anchor, strategy="block_expand", num_blocks=1)
    with pytest.raises(FileNotFoundError, match="data file .*missing.jsonl.* does not exist"):
        c.fit("./missing.jsonl", **FIT)


def test_text_without_tokenizer(anchor, tmp_path):
    c = Composer(anchor, strategy="block_expand", num_blocks=1)
    assert c.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer is known"):
        c.fit(["some text"], output_dir=str(tmp_path / "run"), **FIT)
    assert not (tmp_path / "run").exists()


def test_empty_dataset(anchor):
    c = Composer(anchor, strategy="block_expand", num_blocks=1)
    with pytest.raises(ValueError, match="empty"):
        c.fit([], **FIT)


def test_seq_len_beyond_positions(anchor, tmp_path):
    c = Composer(anchor, strategy="block_expand", num_blocks=1)
    with pytest.raises(ValueError, match=r"seq_len=4096 is beyond the model's 128 positions"):
        c.fit([{"input_ids": [5] * 50}], **{**FIT, "seq_len": 4096}, output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unknown_training_option(anchor):
    c = Composer(anchor, strategy="block_expand", num_blocks=1)
    with pytest.raises(TypeError, match="unknown training option.*'lr'"):
        c.fit([{"input_ids": [5] * 50}], lr=1e-3)


def test_augment_rejected_for_block_expand(anchor):
    with pytest.raises(ValueError, match="takes no augmenting model"):
        Composer(anchor, anchor, strategy="block_expand", num_blocks=1)


def test_existing_checkpoints_are_not_overwritten(anchor, tmp_path, random_ids):
    c = Composer(anchor, strategy="block_expand", num_blocks=1)
    c.fit(random_ids(4, 20), output_dir=str(tmp_path), **FIT)
    with pytest.raises(ValueError, match="already holds an? (unfinished|finished) run.*pass resume=True"):
        Composer(anchor, strategy="block_expand", num_blocks=1).fit(random_ids(4, 20), output_dir=str(tmp_path), **FIT)


def test_failed_save_leaves_no_directory(anchor, tmp_path, monkeypatch):
    c = Composer(anchor, strategy="block_expand", num_blocks=1)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(c.strategy, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        c.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_previous_output(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as d:
        (d / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as d:
            (d / "a.txt").write_text("v2-partial")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_load_needs_compose_json(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="compose.json"):
        Composer.load(tmp_path)


def test_not_a_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        Composer(torch.nn.Linear(2, 2), strategy="block_expand", num_blocks=1)
