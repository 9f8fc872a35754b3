"""A catalogue of hostile inputs and faults: each ends in a clear error naming the thing, or the right result.

Every case also checks that nothing that existed before was changed (files keep their bytes,
no output directory appears for a run that was refused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _launch import child_env

import compose.io as cio
from compose import Composer
from compose.io import (
    COMPLETE_NAME,
    LOCK_NAME,
    MARKER,
    LockError,
    OutputError,
    atomic_directory,
    recover_directory,
)
from compose.recipe import RecipeError, check_recipe, load_output, run_recipe
from compose.testing import tiny_model, tiny_tokenizer
from compose.validation import OptionError, validate_generate_options

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ROOT / "recipes" / "tiny" / "data"
NAN, INF = float("nan"), float("inf")
FIT = dict(max_steps=1, learning_rate=1e-2, batch_size=2, seq_len=8, progress=False, report_to=None)


def _ids(n: int = 4, length: int = 20, vocab: int = 96) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, vocab, (length,), generator=g).tolist()} for _ in range(n)]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def anchor():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def expand(anchor):
    return Composer(anchor, strategy="block_expand", num_blocks=1)


@pytest.fixture
def user_dir(tmp_path):
    """A directory holding a user's file that compose must never change."""
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("\\documentclass{article} years of work")
    return d


# ============================================================================ API: strategy options
STRATEGY_CASES = [
    # (strategy, options, the option the error must name)
    ("block_expand", {"num_blocks": 0}, "num_blocks"),
    ("block_expand", {"num_blocks": -1}, "num_blocks"),
    ("block_expand", {"num_blocks": 1.5}, "num_blocks"),
    ("block_expand", {"num_blocks": "2"}, "num_blocks"),
    ("block_expand", {"num_blocks": True}, "num_blocks"),
    ("block_expand", {"num_blocks": NAN}, "num_blocks"),
    ("block_expand", {"num_blocks": 10**6}, "num_blocks"),
    ("block_expand", {"num_blocks": 17}, "num_blocks"),
    ("block_expand", {"placement": [1.7]}, "placement"),
    ("block_expand", {"placement": ["1"]}, "placement"),
    ("block_expand", {"placement": [True]}, "placement"),
    ("block_expand", {"placement": 2}, "placement"),
    ("block_expand", {"placement": "middle", "num_blocks": 1}, "placement"),
    ("block_expand", {"placement": [], "num_blocks": 1}, "placement"),
    ("block_expand", {"placement": [9]}, "placement"),
    ("block_expand", {"num_blocks": 1, "train_embeddings": "no"}, "train_embeddings"),
    ("block_expand", {"num_blocks": 1, "train_embeddings": "false"}, "train_embeddings"),
    ("block_expand", {"num_blocks": 1, "train_embeddings": 1}, "train_embeddings"),
    ("block_expand", {"num_blocks": 1, "num_block": 2}, "num_block"),
    ("lora", {"r": 0}, "r="),
    ("lora", {"r": -4}, "r="),
    ("lora", {"r": 2.5}, "r="),
    ("lora", {"r": "8"}, "r="),
    ("lora", {"r": True}, "r="),
    ("lora", {"alpha": 0}, "alpha"),
    ("lora", {"alpha": NAN}, "alpha"),
    ("lora", {"alpha": INF}, "alpha"),
    ("lora", {"alpha": "16"}, "alpha"),
    ("lora", {"dropout": 1.0}, "dropout"),
    ("lora", {"dropout": -0.1}, "dropout"),
    ("lora", {"dropout": NAN}, "dropout"),
    ("lora", {"bias": "some"}, "bias"),
    ("lora", {"use_rslora": "false"}, "use_rslora"),
    ("lora", {"use_rslora": "no"}, "use_rslora"),
    ("lora", {"use_rslora": 1}, "use_rslora"),
    ("lora", {"target_modules": 5}, "target_modules"),
    ("lora", {"target_modules": []}, "target_modules"),
    ("lora", {"rank": 8}, "rank"),
    ("full", {"train_embeddings": "no"}, "train_embeddings"),
    ("full", {"train_embeddings": "false"}, "train_embeddings"),
    ("full", {"train_embeddings": None}, "train_embeddings"),
    ("calm", {"every": 0}, "every"),
    ("calm", {"every": "4"}, "every"),
    ("calm", {"every": 1.5}, "every"),
    ("calm", {"every": True}, "every"),
    ("calm", {"norm": "no"}, "norm"),
    ("calm", {"gate": "yes"}, "gate"),
    ("calm", {"null_kv": "false"}, "null_kv"),
    ("calm", {"window": 0}, "window"),
    ("calm", {"window": 1.5}, "window"),
    ("calm", {"num_heads": 0}, "num_heads"),
    ("calm", {"num_heads": "4"}, "num_heads"),
    ("calm", {"out_scale": 0}, "out_scale"),
    ("calm", {"out_scale": NAN}, "out_scale"),
    ("calm", {"out_scale": "1"}, "out_scale"),
]


@pytest.mark.parametrize("strategy,options,named", STRATEGY_CASES, ids=lambda x: repr(x)[:40])
def test_bad_strategy_option_is_named(anchor, strategy, options, named):
    augment = tiny_model("qwen2", seed=1) if strategy == "calm" else None
    with pytest.raises(ValueError, match=named):
        Composer(anchor, augment, strategy=strategy, **options)


def test_strategy_config_object_is_validated_too(anchor):
    from compose.strategies import LoraConfig

    config = LoraConfig()
    with pytest.raises(OptionError, match="use_rslora='no'.*true/false"):
        config.use_rslora = "no"  # set after construction: still caught, where it is set
    with pytest.raises(OptionError, match="r=0 is not accepted"):
        config.r = 0
    Composer(anchor, strategy=config)  # still the valid options


def test_num_blocks_limit_is_checked_before_memory_grows(anchor):
    with pytest.raises(OptionError, match=r"at most 4 x 4 = 16"):
        Composer(anchor, strategy="block_expand", num_blocks=10**6)


@pytest.mark.parametrize("bad", [{"copy_model": "no"}, {"dtype": "float8"}, {"strategy": 5}])
def test_bad_composer_argument(anchor, bad):
    with pytest.raises((ValueError, TypeError), match="copy_model|dtype|strategy"):
        Composer(anchor, **{"strategy": "full", **bad})


# ============================================================================ API: training options
TRAIN_CASES = [
    ("learning_rate", INF),
    ("learning_rate", NAN),
    ("learning_rate", -1e-3),
    ("learning_rate", 0),
    ("learning_rate", "1e-3"),
    ("learning_rate", True),
    ("learning_rate", None),
    ("weight_decay", NAN),
    ("weight_decay", -0.1),
    ("weight_decay", "0.1"),
    ("weight_decay", INF),
    ("max_grad_norm", NAN),
    ("max_grad_norm", -1),
    ("max_grad_norm", 0),
    ("max_grad_norm", "1"),
    ("min_lr_ratio", -1),
    ("min_lr_ratio", 1.5),
    ("min_lr_ratio", NAN),
    ("warmup_ratio", 1.0),
    ("warmup_ratio", -0.1),
    ("eval_batches", 0),
    ("eval_batches", -1),
    ("eval_batches", 1.5),
    ("max_steps", 0),
    ("max_steps", 1.5),
    ("max_steps", "10"),
    ("max_steps", True),
    ("max_steps", -3),
    ("batch_size", 0),
    ("batch_size", 2.0),
    ("batch_size", True),
    ("seq_len", 0),
    ("seq_len", "16"),
    ("gradient_accumulation_steps", 0),
    ("packing", "no"),
    ("packing", "false"),
    ("packing", 1),
    ("packing", None),
    ("mask_prompt", "no"),
    ("gradient_checkpointing", "yes"),
    ("chunked_loss", "no"),
    ("progress", "false"),
    ("overwrite_output_dir", "yes"),
    ("lr_scheduler", "cos"),
    ("lr_scheduler", 1),
    ("mixed_precision", "bf17"),
    ("mixed_precision", True),
    ("adam_betas", (0.9,)),
    ("adam_betas", (0.9, 1.5)),
    ("adam_betas", "0.9,0.95"),
    ("adam_betas", (NAN, 0.9)),
    ("adam_eps", 0),
    ("adam_eps", -1e-8),
    ("keep_checkpoints", 0),
    ("seed", -1),
    ("seed", 1.5),
    ("log_every", -1),
    ("save_every", -2),
    ("eval_every", 1.5),
    ("loss_chunk_tokens", 0),
    ("report_to", 5),
    ("text_field", 3),
    ("callbacks", [5]),
    ("lr", 1e-3),
    ("learningrate", 1e-3),
]


@pytest.mark.parametrize("name,value", TRAIN_CASES, ids=lambda x: repr(x)[:30])
def test_bad_training_option_is_named_and_nothing_is_written(expand, tmp_path, name, value):
    out = tmp_path / "run"
    with pytest.raises(OptionError, match=name) as e:
        expand.fit(_ids(), **{**FIT, name: value}, output_dir=str(out))
    assert "accepted" in str(e.value) or "expected" in str(e.value)
    assert not out.exists()


def test_string_number_error_names_option_value_and_type(expand):
    with pytest.raises(
        OptionError, match=r"learning_rate='1e-3' \(str\) is not accepted; expected a finite number > 0"
    ):
        expand.fit(_ids(), **{**FIT, "learning_rate": "1e-3"})


def test_unknown_training_option_suggests(expand):
    with pytest.raises(TypeError, match=r"'learnig_rate'.*did you mean 'learning_rate'"):
        expand.fit(_ids(), **FIT, learnig_rate=1e-3)


# ============================================================================ API: data and models
@pytest.mark.parametrize(
    "data,match",
    [
        ([{"input_ids": [5, 6, 500]}], r"train_data\[0\]: token id 500 .*0\.\.95"),
        ([{"input_ids": [5]}, {"input_ids": [-1, 5]}], r"train_data\[1\]: token id -1"),
        ([{"input_ids": ["a", "b"]}], r"train_data\[0\]: input_ids must be a list of integer"),
        ([{"input_ids": [5.5, 6]}], r"train_data\[0\]: input_ids must be a list of integer"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_caught_before_the_forward(expand, tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        expand.fit(data, **FIT, output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_out_of_vocabulary_eval_data(expand):
    with pytest.raises(ValueError, match=r"eval_data\[0\]: token id 96"):
        expand.fit(_ids(), [{"input_ids": [96, 5]}], **FIT)


def test_tokenizer_larger_than_the_model_vocabulary(anchor):
    small = tiny_model("llama", vocab=64)
    with pytest.raises(ValueError, match=r"tokenizer .* 96 tokens but the model's embedding has 64 rows"):
        Composer(small, strategy="full", tokenizer=tiny_tokenizer())


def test_seq_len_beyond_positions_names_the_limit(expand, tmp_path):
    with pytest.raises(OptionError, match=r"seq_len=4096 is beyond the model's 128 positions.*seq_len <= 128"):
        expand.fit(_ids(), **{**FIT, "seq_len": 4096}, output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_augment_with_fewer_positions_than_seq_len(anchor):
    short = tiny_model("qwen2", seed=1, positions=32)
    c = Composer(anchor, short, strategy="calm", every=2)
    with pytest.raises(OptionError, match=r"seq_len=64 is beyond the augmenting model 0's 32 positions"):
        c.fit(_ids(length=80), **{**FIT, "seq_len": 64})


@pytest.mark.parametrize("source", ["nonexistent-org/nonexistent-model", "nonexistent-model-name"])
def test_hub_id_fails_fast_offline(source, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=rf"anchor '{source}' is not a local directory.*HF_HUB_OFFLINE.*download"):
        Composer(source, strategy="full")


def test_hub_id_fails_fast_without_network(monkeypatch):
    import compose.loading as cc

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(cc, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(OSError, match=r"hub cannot be reached.*huggingface-cli download"):
        Composer("nonexistent-org/nonexistent-model", strategy="full")


def test_tokenizer_hub_id_fails_fast_offline(anchor, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"tokenizer 'nobody/no-tokenizer'.*HF_HUB_OFFLINE"):
        Composer(anchor, strategy="full", tokenizer="nobody/no-tokenizer")


@pytest.mark.parametrize("source", ["./no/such/dir", "/no/such/dir", "a/b/c"])
def test_missing_model_directory(source):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Composer(source, strategy="full")


def test_missing_tokenizer_directory(anchor):
    with pytest.raises(FileNotFoundError, match=r"tokenizer directory './no/tok' does not exist"):
        Composer(anchor, strategy="full", tokenizer="./no/tok")


def test_not_a_tokenizer(anchor):
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer"):
        Composer(anchor, strategy="full", tokenizer=42)


def test_lora_adapter_onto_another_base_is_named(anchor, tmp_path):
    c = Composer(anchor, strategy="lora", r=2)
    c.save(tmp_path / "adapter")
    before = _snapshot(tmp_path)
    with pytest.raises(
        ValueError, match=r"trained on another base model.*model_type: adapter 'llama' vs anchor 'qwen2'"
    ):
        Composer.load(tmp_path / "adapter", anchor=tiny_model("qwen2"))
    assert _snapshot(tmp_path) == before


def test_lora_adapter_onto_its_base_loads(anchor, tmp_path):
    c = Composer(anchor, strategy="lora", r=2)
    c.save(tmp_path / "adapter")
    back = Composer.load(tmp_path / "adapter", anchor=anchor)
    ids = torch.randint(3, 96, (1, 8))
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=ids).logits, c.model(input_ids=ids).logits)


# ============================================================================ generation options
@pytest.mark.parametrize(
    "options,named",
    [
        ({"max_new_tokens": 10**9}, "max_new_tokens=1000000000"),
        ({"max_new_tokens": 121}, r"max_new_tokens <= 120"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": "5"}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": NAN}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"do_sample": "no"}, "do_sample"),
        ({"num_beams": 0}, "num_beams"),
    ],
)
def test_bad_generation_option(options, named):
    with pytest.raises(OptionError, match=named):
        validate_generate_options(options, prompt_length=8, max_positions=128)


@pytest.mark.parametrize(
    "options,mask,named",
    [
        ({"max_new_tokens": 10**9}, None, "max_new_tokens=1000000000"),
        ({"max_new_tokens": 2, "num_beams": 0}, None, "num_beams"),
        ({"max_new_tokens": 2}, [[0, 1, 1, 1, 1, 0]], "padding"),
        ({"max_new_tokens": 2}, [[1, 1, 1, 1, 1, 0]], "padding"),
    ],
)
def test_composer_generate_checks_options_and_padding_before_decoding(expand, options, mask, named):
    ids = torch.randint(3, 90, (1, 6))
    mask = None if mask is None else torch.tensor(mask)
    with pytest.raises(OptionError, match=named):
        expand.generate(ids, attention_mask=mask, **options)


def test_composer_generate_refuses_ids_outside_the_vocabulary(expand):
    with pytest.raises(OptionError, match="input_ids"):
        expand.generate(torch.tensor([[1, 2, 10**6]]), max_new_tokens=2)


def test_good_generation_options_pass():
    out = validate_generate_options(
        {"max_new_tokens": 120, "temperature": 1, "pad_token_id": 0}, prompt_length=8, max_positions=128
    )
    assert out == {"max_new_tokens": 120, "temperature": 1.0, "pad_token_id": 0}


# ============================================================================ recipes
BASE = {
    "anchor": "tiny:llama",
    "strategy": "block_expand",
    "options": {"num_blocks": 1},
    "data": {"train": str(TINY_DATA / "code.txt"), "seq_len": 16},
    "train": {"max_steps": 1, "batch_size": 2, "progress": False, "report_to": None},
    "eval": {"plots": False},
}

RECIPE_OVERRIDE_CASES = [
    (["train=5"], r"section 'train' must be a mapping"),
    (["data=3"], r"section 'data' must be a mapping"),
    (["eval=[1]"], r"section 'eval' must be a mapping"),
    (["options=7"], r"section 'options' must be a mapping"),
    (["output=x"], r"section 'output' must be a mapping"),
    (["train.learning_rate='1e-3'"], r"train: learning_rate='1e-3' \(str\).*finite number > 0"),
    (["train.learning_rate=.inf"], r"learning_rate=inf"),
    (["train.learning_rate=-1"], r"learning_rate=-1"),
    (["train.weight_decay=.nan"], r"weight_decay=nan"),
    (["train.max_grad_norm=-1"], r"max_grad_norm=-1"),
    (["train.min_lr_ratio=2"], r"min_lr_ratio=2"),
    (["train.eval_batches=0"], r"eval_batches=0"),
    (["train.max_steps=1.5"], r"max_steps=1.5"),
    (["train.max_steps=many"], r"max_steps='many'"),
    (["train.mixed_precision=bf17"], r"mixed_precision='bf17'"),
    (["train.lerning_rate=1"], r"did you mean 'learning_rate'"),
    (["train.seq_len=16"], r"data.seq_len"),
    (["data.seq_len=0"], r"data: seq_len=0"),
    (["data.seq_len=4096"], r"data.seq_len=4096 is beyond the anchor's 128 positions"),
    (["data.packing='no'"], r"data: packing='no'"),
    (["data.text_field=3"], r"text_field=3"),
    (["data.train={path: x.txt}"], r"data file 'x.txt' does not exist"),
    ([f"data.train={{path: {TINY_DATA / 'code.txt'}, max_records: -3}}"], r"max_records=-3"),
    ([f"data.train={{path: {TINY_DATA / 'code.txt'}, max_records: 1.5}}"], r"max_records=1.5"),
    ([f"data.train={{path: {TINY_DATA / 'code.txt'}, weight: 0}}"], r"weight=0"),
    ([f"data.train={{path: {TINY_DATA / 'code.txt'}, weight: '2'}}"], r"weight='2'"),
    ([f"data.train={{path: {TINY_DATA / 'code.txt'}, wieght: 2}}"], r"unknown key.*wieght"),
    (["options.num_blocks=1.5"], r"options: num_blocks=1.5"),
    (["options.placement=[1.7]", "options.num_blocks=null"], r"placement=\[1.7\]"),
    (["options.num_blocks=100"], r"num_blocks=100 .*at most 4 x 4 = 16"),
    (["options.num_blok=1"], r"'num_blok'"),
    (["strategy=lora", "options={use_rslora: 'false'}"], r"use_rslora='false'"),
    (["dtype=float8"], r"dtype 'float8'"),
    (["anchor=tiny:nope"], r"unknown tiny family 'nope'"),
    (["anchor=tiny:llama?hidden=0"], r"hidden='0'"),
    (["anchor=tiny:llama?tie=maybe"], r"tie='maybe'"),
    (["anchor=./no/model"], r"model directory './no/model' does not exist"),
    (["eval.batch_size=0"], r"eval: batch_size=0"),
    (["eval.max_batches=0"], r"max_batches=0"),
    (["eval.plots='no'"], r"plots='no'"),
    (["eval.domain=[code]"], r"eval.domain names \['code'\]"),
    (["eval.lm_eval={tasks: []}"], r"eval.lm_eval.tasks is empty"),
    (["eval.lm_eval={tasks: 5}"], r"eval.lm_eval: tasks=5"),
    (["eval.lm_eval={tasks: [hellaswag], limit: 0}"], r"limit=0"),
    (["eval.lm_eval={tasks: [hellaswag], num_fewshot: -1}"], r"num_fewshot=-1"),
    (["eval.lm_eval={tasks: [hellaswag], num_fewshot: 1.5}"], r"num_fewshot=1.5"),
    (["eval.lm_eval={tasks: [hellaswag], batch_size: 0}"], r"batch_size=0"),
    (["eval.lm_eval={tasks: [hellaswag], shots: 2}"], r"unknown key.*'shots'"),
    (["eval.lm_eval=3"], r"eval.lm_eval must be a mapping"),
    (["train.max_steps"], r"not of the form key=value"),
    (["=3"], r"has no key"),
    (["train..max_steps=1"], r"empty part"),
    (["train.max_steps.x=1"], r"'train.max_steps' is a value, not a section"),
    (["stages.3.train.max_steps=1"], r"there is no list item '3'"),
]


@pytest.mark.parametrize("overrides,match", RECIPE_OVERRIDE_CASES, ids=lambda x: str(x)[:40])
def test_bad_recipe_value_is_named(tmp_path, overrides, match):
    recipe = {**BASE, "output": {"dir": str(tmp_path / "run")}}
    if overrides[0].startswith("stages."):
        recipe["stages"] = [{"name": "a"}]
    with pytest.raises(RecipeError, match=match):
        check_recipe(recipe, overrides)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("data", "packing", "no"),
        ("data", "mask_prompt", "false"),
        ("train", "learning_rate", "2e-4"),
        ("train", "gradient_checkpointing", "yes"),
        ("options", "train_embeddings", "no"),
        ("eval", "baseline", "true"),
    ],
)
def test_string_values_in_a_recipe_mapping_are_errors(section, key, value):
    recipe = {**BASE, section: {**BASE.get(section, {}), key: value}}
    with pytest.raises(RecipeError, match=rf"{key}='{value}' \(str\)"):
        check_recipe(recipe)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../up", "", "~home", " x", 5])
def test_stage_names_are_single_safe_path_components(tmp_path, name):
    recipe = {**BASE, "output": {"dir": str(tmp_path / "run")}, "stages": [{"name": name}]}
    with pytest.raises(RecipeError, match=r"stages\[0\]: stage name="):
        check_recipe(recipe)


def test_repeated_stage_name(tmp_path):
    recipe = {**BASE, "stages": [{"name": "a"}, {"name": "a", "strategy": "full"}]}
    with pytest.raises(RecipeError, match=r"stages\[1\].*'a' is used twice"):
        check_recipe(recipe)


@pytest.fixture
def lm_eval_available(monkeypatch):
    import compose.evaluate

    if not hasattr(compose.evaluate, "lm_eval"):
        monkeypatch.setattr(compose.evaluate, "lm_eval", lambda *a, **k: {}, raising=False)


def test_lm_eval_dependencies_are_checked_before_training(monkeypatch, lm_eval_available):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(RecipeError, match=r"eval.lm_eval needs the lm-evaluation-harness package: pip install lm-eval"):
        check_recipe(BASE, ["eval.lm_eval={tasks: [hellaswag]}"])


def test_valid_lm_eval_section_and_counts(monkeypatch, lm_eval_available):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "lm_eval" else real(name, *a))
    recipe = check_recipe(BASE, ["eval.lm_eval={tasks: [hellaswag], num_fewshot: 0, limit: 10}"])
    assert recipe.stages[0].config.eval.lm_eval.tasks == ["hellaswag"]
    assert recipe.stages[0].config.eval.lm_eval.batch_size == 8
    assert recipe.counts["main"] == sum(p.numel() for p in tiny_model("llama").model.layers[0].parameters())


def test_non_utf8_recipe_names_the_file_and_byte(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"strategy: full\nanchor: \xff\xfe\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: not UTF-8 text \(byte \d+\)"):
        check_recipe(bad)


def test_recipe_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match=r"list.yaml: a recipe is a mapping"):
        check_recipe(bad)


def test_overrides_given_as_one_string():
    with pytest.raises(RecipeError, match="overrides must be a list"):
        check_recipe(BASE, "train.max_steps=2")


# ============================================================================ command line
def test_cli_check_reports_the_option(tmp_path, capsys):
    import yaml

    from compose.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert main(["check", str(path), "--set", "train.learning_rate=-1"]) == 1
    assert "learning_rate=-1" in capsys.readouterr().err
    assert main(["check", str(path)]) == 0
    assert "trainable parameters" in capsys.readouterr().out


def test_cli_train_bad_override_exits_1_and_writes_nothing(tmp_path, capsys):
    import yaml

    from compose.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output": {"dir": str(tmp_path / "run")}}))
    assert main(["train", str(path), "train.packing=1"]) == 1
    assert "packing" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_cli_generate_max_new_tokens_must_be_positive(value, capsys):
    from compose.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "somewhere", "--prompt", "x", "--max-new-tokens", value])
    assert e.value.code == 2 and "positive integer" in capsys.readouterr().err


def test_cli_export_refuses_a_foreign_directory(anchor, tmp_path, user_dir, capsys):
    from compose.cli import main

    Composer(anchor, strategy="block_expand", num_blocks=1).save(tmp_path / "model")
    before = _snapshot(user_dir)
    assert main(["export", str(tmp_path / "model"), str(user_dir)]) == 1
    assert "thesis.tex" in capsys.readouterr().err and _snapshot(user_dir) == before
    assert main(["export", str(tmp_path / "model"), str(user_dir), "--overwrite"]) == 0
    after = _snapshot(user_dir)
    assert after["thesis.tex"] == before["thesis.tex"] and "config.json" in after


# ============================================================================ outputs never destroyed
def test_save_into_a_users_directory_is_refused(expand, user_dir):
    before = _snapshot(user_dir)
    with pytest.raises(OutputError, match=r"thesis.tex.*overwrite=True"):
        expand.save(user_dir)
    assert _snapshot(user_dir) == before and sorted(p.name for p in user_dir.parent.iterdir()) == ["mine"]


def test_save_with_overwrite_keeps_the_users_files(expand, user_dir):
    before = _snapshot(user_dir)
    expand.save(user_dir, overwrite=True)
    after = _snapshot(user_dir)
    assert after["thesis.tex"] == before["thesis.tex"] and "compose.json" in after
    expand.save(user_dir)  # compose's own directory now: saving again is fine, the file still kept
    assert _snapshot(user_dir)["thesis.tex"] == before["thesis.tex"]


def test_resave_keeps_a_file_added_to_compose_output(expand, tmp_path):
    out = tmp_path / "model"
    expand.save(out)
    (out / "notes.md").write_text("my notes")
    expand.save(out)
    assert (out / "notes.md").read_text() == "my notes"
    assert "notes.md" not in cio.owned_files(out)


def test_save_onto_a_file_is_refused(expand, tmp_path):
    f = tmp_path / "report.docx"
    f.write_bytes(b"PK\x03\x04 word")
    with pytest.raises(OutputError, match="is a file"):
        expand.save(f)
    assert f.read_bytes() == b"PK\x03\x04 word"


def test_save_refuses_non_finite_weights(anchor, tmp_path):
    c = Composer(anchor, strategy="block_expand", num_blocks=1)
    with torch.no_grad():
        next(iter(c.trainable_parameters().values())).fill_(float("nan"))
    with pytest.raises(ValueError, match=r"NaN or inf.*learning rate"):
        c.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_into_a_users_directory_is_refused(anchor, user_dir):
    from compose.export import export_plain

    before = _snapshot(user_dir)
    with pytest.raises(OutputError, match="thesis.tex"):
        export_plain(Composer(anchor, strategy="full"), user_dir)
    assert _snapshot(user_dir) == before


def test_merge_and_export_into_a_users_directory_is_refused(anchor, user_dir):
    from compose.strategies import merge_and_export

    before = _snapshot(user_dir)
    with pytest.raises(OutputError, match="thesis.tex"):
        merge_and_export(Composer(anchor, strategy="lora", r=2), user_dir)
    assert _snapshot(user_dir) == before


def test_unwritable_disk_during_save_keeps_the_previous_save(expand, tmp_path, monkeypatch):
    out = tmp_path / "model"
    expand.save(out)
    before = _snapshot(tmp_path)

    def full(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(cio, "write_text", full)
    with pytest.raises(OSError, match="No space left"):
        expand.save(out)
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("kill_at", [1, 2])
def test_kill_between_the_renames_of_a_save_is_recovered(expand, tmp_path, monkeypatch, kill_at):
    """A kill at either rename of the swap: the next use finds a whole model at the path."""
    out = tmp_path / "model"
    expand.save(out)
    real, calls = os.replace, []

    class Killed(BaseException):
        pass

    def dying_replace(src, dst):
        if Path(dst).parent == tmp_path:
            calls.append(dst)
            if len(calls) == kill_at:  # 2: the old copy is aside, the new one complete but not in place
                raise Killed
        return real(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(Killed):
        expand.save(out)
    monkeypatch.setattr(os, "replace", real)
    assert out.exists() == (kill_at == 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = load_output(out)  # recovers first
    assert any("restored" in str(w.message) for w in caught) == (kill_at == 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    ids = torch.randint(3, 96, (1, 8))
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=ids).logits, expand.model(input_ids=ids).logits)


def test_kill_minus_9_inside_save_leaves_the_last_good_model(tmp_path):
    """A real SIGKILL in the rename window of ``Composer.save`` (a child process), then recovery."""
    out = tmp_path / "model"
    script = f"""
import os, signal
from pathlib import Path
from compose import Composer
from compose.testing import tiny_model
c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=1)
c.save({str(out)!r})
real = os.replace
def replace(src, dst):
    real(src, dst)
    if Path(src).name == "model":  # the old copy is moved aside: die before the new one is in place
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
c.save({str(out)!r})
"""
    env = child_env()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not out.exists() and any(p.name.startswith(".model.") for p in tmp_path.iterdir())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = load_output(out)
    assert any("restored" in str(w.message) for w in caught)
    assert back.model.config.num_hidden_layers == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _swap_state(tmp_path: Path, *, tmp_complete: bool, path_exists: bool) -> Path:
    path = tmp_path / "final"
    dead = 2**22 + 12345  # beyond pid_max on common systems: a dead writer
    old = tmp_path / f".final.old-{dead}-aaaa"
    new = tmp_path / f".final.tmp-{dead}-aaaa"
    for d, text in ((old, "old"), (new, "new")):
        d.mkdir()
        (d / "weights").write_text(text)
    if tmp_complete:
        (new / MARKER).write_text('{"files": ["weights"]}')
    if path_exists:
        path.mkdir()
        (path / "weights").write_text("current")
    return path


@pytest.mark.parametrize(
    "tmp_complete,path_exists,expected",
    [(True, False, "new"), (False, False, "old"), (True, True, "current"), (False, True, "current")],
)
def test_recovery_of_leftover_swap_folders(tmp_path, tmp_complete, path_exists, expected):
    path = _swap_state(tmp_path, tmp_complete=tmp_complete, path_exists=path_exists)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert recover_directory(path)
    assert (path / "weights").read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_recovery_leaves_a_live_writers_folder(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".final.tmp-{sleeper.pid}-bbbb"
        busy.mkdir()
        (tmp_path / "final").mkdir()
        assert not recover_directory(tmp_path / "final")
        assert busy.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_failed_write_inside_atomic_directory_keeps_old(tmp_path):
    with atomic_directory(tmp_path / "out") as d:
        (d / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as d:
            (d / "a.txt").write_text("v2-partial")
            raise RuntimeError("disk full")
    assert (tmp_path / "out" / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ============================================================================ runs: lock, markers, restarts
@pytest.fixture
def finished_run(anchor, tmp_path):
    out = tmp_path / "run"
    Composer(anchor, strategy="block_expand", num_blocks=1).fit(_ids(), **FIT, output_dir=str(out))
    return out


def test_a_run_writes_its_completion_marker_last(finished_run):
    assert (finished_run / COMPLETE_NAME).is_file() and not (finished_run / LOCK_NAME).exists()
    marker_time = (finished_run / COMPLETE_NAME).stat().st_mtime_ns
    others = [p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file() and p.name != COMPLETE_NAME]
    assert marker_time >= max(others)


@pytest.mark.parametrize("remove_checkpoints", [False, True])
def test_fresh_fit_into_a_finished_run_is_refused(anchor, finished_run, remove_checkpoints):
    import shutil

    if remove_checkpoints:
        shutil.rmtree(finished_run / "checkpoints")
    before = _snapshot(finished_run)
    with pytest.raises(OutputError, match=r"already holds a finished run.*resume=True.*overwrite_output_dir=True"):
        Composer(anchor, strategy="block_expand", num_blocks=1).fit(_ids(), **FIT, output_dir=str(finished_run))
    assert _snapshot(finished_run) == before


def test_overwrite_starts_over_with_fresh_metrics(anchor, finished_run):
    lines = (finished_run / "metrics.jsonl").read_text().splitlines()
    c = Composer(anchor, strategy="block_expand", num_blocks=1)
    c.fit(_ids(), **FIT, output_dir=str(finished_run), overwrite_output_dir=True)
    assert len((finished_run / "metrics.jsonl").read_text().splitlines()) == len(lines)
    assert (finished_run / COMPLETE_NAME).is_file()


def test_fit_into_a_foreign_directory(anchor, user_dir):
    before = _snapshot(user_dir)
    c = Composer(anchor, strategy="block_expand", num_blocks=1)
    with pytest.raises(OutputError, match=r"thesis.tex.*overwrite_output_dir=True"):
        c.fit(_ids(), **FIT, output_dir=str(user_dir))
    assert _snapshot(user_dir) == before
    c.fit(_ids(), **FIT, output_dir=str(user_dir), overwrite_output_dir=True)
    assert _snapshot(user_dir)["thesis.tex"] == before["thesis.tex"] and (user_dir / "final" / "compose.json").is_file()


_HOLD_LOCK = "import sys, time\nfrom compose.io import output_lock\nwith output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n"


def test_second_live_run_is_refused(anchor, tmp_path):
    """A live run's lock refuses a second run; once that run is killed (the OS frees its lock) its file is taken over."""
    out = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"in use by process {other.pid} on {socket.gethostname()}"):
            Composer(anchor, strategy="block_expand", num_blocks=1).fit(_ids(), **FIT, output_dir=str(out))
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        other.kill()
        other.wait()
        other.stdout.close()
    with pytest.warns(UserWarning, match=rf"stale lock .* process {other.pid}"):
        Composer(anchor, strategy="block_expand", num_blocks=1).fit(_ids(), **FIT, output_dir=str(out))
    assert (out / COMPLETE_NAME).is_file() and not (out / LOCK_NAME).exists()


def test_lock_from_another_host_is_refused(anchor, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text('{"pid": 1, "host": "elsewhere", "started": "then"}')
    with pytest.raises(LockError, match=r"process 1 on elsewhere.*delete"):
        Composer(anchor, strategy="block_expand", num_blocks=1).fit(_ids(), **FIT, output_dir=str(out))


def test_full_disk_while_writing_results_leaves_the_run_incomplete(tmp_path, monkeypatch):
    real = cio.write_text

    def full(path, text):
        if Path(path).name == "results.json":
            raise OSError(28, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(cio, "write_text", full)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        run_recipe(check_recipe({**BASE, "output": {"dir": str(out)}}), log=lambda *a: None)
    assert not (out / COMPLETE_NAME).exists() and not (out / "final" / "results.json").exists()
    assert not (out / LOCK_NAME).exists()
    assert not any(p.name.startswith(".results") for p in (out / "final").iterdir())
    with pytest.warns(UserWarning, match="did not finish"):
        load_output(out / "final")


def test_recipe_rerun_into_a_finished_run_is_refused(tmp_path):
    recipe = {**BASE, "output": {"dir": str(tmp_path / "run")}}
    run_recipe(check_recipe(recipe), log=lambda *a: None)
    before = _snapshot(tmp_path / "run")
    with pytest.raises(OutputError, match="finished run"):
        run_recipe(check_recipe(recipe), log=lambda *a: None)
    assert _snapshot(tmp_path / "run") == before
    run_recipe(check_recipe(recipe, ["train.overwrite_output_dir=true"]), log=lambda *a: None)
    assert (tmp_path / "run" / COMPLETE_NAME).is_file()


def test_damaged_compose_json_names_the_file(expand, tmp_path):
    expand.save(tmp_path / "model")
    (tmp_path / "model" / "compose.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"compose.json is not valid JSON"):
        load_output(tmp_path / "model")


def test_finite_numbers_stay_accepted(expand, tmp_path):
    """The strict layer does not reject what is fine: ints for floats, None where allowed, 0 where allowed."""
    expand.fit(_ids(), **{**FIT, "learning_rate": 1, "weight_decay": 0, "max_grad_norm": None, "eval_batches": None})
    assert math.isfinite(expand.history[-1]["loss"])


def test_cli_generate_beyond_the_model_positions(anchor, tmp_path, capsys):
    from compose.cli import main

    Composer(anchor, strategy="full", tokenizer=tiny_tokenizer()).save(tmp_path / "model")
    assert main(["generate", str(tmp_path / "model"), "--prompt", "def", "--max-new-tokens", "1000"]) == 1
    assert "max_new_tokens=1000" in capsys.readouterr().err


def test_next_run_restores_a_final_left_in_the_rename_window(anchor, finished_run):
    aside = finished_run / f".final.old-{2**22 + 7}-cccc"
    os.replace(finished_run / "final", aside)  # what a kill between the two renames leaves
    before = _snapshot(aside)
    with pytest.warns(UserWarning, match="restored"):
        with pytest.raises(OutputError, match="finished run"):
            Composer(anchor, strategy="block_expand", num_blocks=1).fit(_ids(), **FIT, output_dir=str(finished_run))
    assert _snapshot(finished_run / "final") == before and not aside.exists()


# ============================================================================ data files
@pytest.fixture
def bad_files(tmp_path):
    files = {
        "latin1.txt": "caf\u00e9 au lait\n".encode("latin-1"),
        "late.txt": b"line one\nline two\nx\xff\n",
        "broken.jsonl": b'{"text": "ok"}\n{"text": "half\n',
        "latin1.jsonl": b'{"text": "ok"}\n{"text": "\xe9"}\n',
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


@pytest.mark.parametrize(
    "name,match",
    [
        ("latin1.txt", r"latin1.txt: not UTF-8 text at byte 3 \(line 1\)"),
        ("late.txt", r"late.txt: not UTF-8 text at byte 19 \(line 3\)"),
        ("broken.jsonl", r"broken.jsonl:2: not a JSON record"),
        ("latin1.jsonl", r"latin1.jsonl: not UTF-8 text at byte 25 \(line 2\)"),
    ],
)
def test_bad_data_file_named_with_position_by_fit(expand, bad_files, name, match):
    before = _snapshot(bad_files)
    with pytest.raises(ValueError, match=match):
        expand.fit(str(bad_files / name), **FIT, output_dir=str(bad_files / "run"))
    assert _snapshot(bad_files) == before and not (bad_files / "run").exists()


@pytest.mark.parametrize("key", ["data.train", "data.eval", "eval.perplexity.general", "eval.exact_match.qa"])
def test_bad_data_file_named_by_check_before_any_training(bad_files, key):
    section, _, rest = key.partition(".")
    value = str(bad_files / "latin1.txt")
    override = f"{key}={value}" if section == "data" else f"eval.{rest.split('.')[0]}={{{rest.split('.')[1]}: {value}}}"
    with pytest.raises(RecipeError, match=rf"{key}: .*latin1.txt: not UTF-8 text at byte 3"):
        check_recipe(BASE, [override])


# ============================================================================ generation inputs
@pytest.mark.parametrize(
    "ids,mask,match",
    [
        (
            [[5, 6, 7], [5, 6, 7]],
            [[1, 1, 1], [1, 1, 0]],
            r"row\(s\) \[1\] are padded at the end.*padding_side = 'left'",
        ),
        ([[5, 6, 7], [0, 5, 0]], [[1, 1, 1], [0, 1, 0]], r"row\(s\) \[1\] are padded at the end"),
        ([[5, 6, 96]], None, r"input_ids: token id 96 is outside"),
        ([[5, -2, 6]], None, r"input_ids: token id -2"),
        ([[5, 6, 7]], [[1, 1]], r"attention_mask must be a tensor of the shape"),
    ],
)
def test_bad_generation_inputs(ids, mask, match):
    from compose.validation import validate_generate_inputs

    mask_t = torch.tensor(mask) if mask is not None else None
    with pytest.raises(OptionError, match=match):
        validate_generate_inputs(torch.tensor(ids), mask_t, vocab=96)


def test_left_padded_generation_inputs_pass():
    from compose.validation import validate_generate_inputs

    validate_generate_inputs(torch.tensor([[0, 5, 6], [4, 5, 6]]), torch.tensor([[0, 1, 1], [1, 1, 1]]), vocab=96)


# ============================================================================ the validation layer itself
@dataclasses.dataclass
class _Future:
    """A config as other options get added: types from annotations, a range from one table line."""

    streaming: bool = False
    num_proc: int | None = None
    train_modules: list[str] | None = None
    later: Unresolvable | None = None  # noqa: F821 - an annotation this layer cannot resolve


@pytest.mark.parametrize(
    "options,match",
    [
        ({"streaming": "no"}, r"streaming='no' \(str\) is not accepted; expected true/false"),
        ({"num_proc": 0}, r"num_proc=0 is not accepted; expected an integer >= 1, or None"),
        ({"num_proc": 2.0}, r"num_proc=2.0"),
        ({"train_modules": "mlp"}, r"train_modules='mlp' \(str\) is not accepted; expected a list of strings, or None"),
        ({"train_modules": ["mlp", 3]}, r"train_modules=\['mlp', 3\]"),
    ],
)
def test_new_options_are_checked_from_their_annotation_and_rule(options, match):
    from compose.train.config import TRAIN_RULES
    from compose.validation import validate_options

    with pytest.raises(OptionError, match=match):
        validate_options(_Future, options, rules=TRAIN_RULES)
    ok = validate_options(_Future, {"streaming": True, "num_proc": 4, "train_modules": ("mlp",), "later": object()})
    assert ok["train_modules"] == ["mlp"]


@pytest.mark.parametrize("keep", [4, 100, -10])
def test_truncated_weights_are_named_on_load(expand, tmp_path, keep):
    expand.save(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"model.safetensors (is cut short|has a damaged header)"):
        load_output(tmp_path / "model")


def test_damaged_weights_header_is_named(expand, tmp_path):
    expand.save(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\xff\xfe\x00!"
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors has a damaged header"):
        load_output(tmp_path / "model")
