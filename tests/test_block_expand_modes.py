"""block_expand's module choice (``train_modules``) and LoRA on the new blocks (``lora``).

The invariants of DESIGN.md in every mode: identity at init, only declared parameters train
and get optimizer state, ``save`` writes a plain transformers checkpoint (adapters merged),
load and resume are exact. Families: llama (biases), qwen2 (qkv biases), gpt2 (Conv1D,
biases, tied embeddings), gemma2 (tied embeddings, sliding layers).
"""

from __future__ import annotations

import json

import pytest
import torch
from _launch import child_env
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compose import Composer, arch
from compose.strategies.block_expand import BlockExpandConfig, NewBlockLora
from compose.testing import tiny_model
from compose.train import latest_checkpoint

FIT = dict(learning_rate=5e-2, batch_size=2, seq_len=16, warmup_ratio=0.0, progress=False, log_every=1)
FAMILIES = ["llama", "qwen2", "gpt2", "gemma2"]
MODES = {
    "mlp": dict(train_modules=["mlp"]),
    "attn_out": dict(train_modules=["o_proj", "c_proj", "dense"]),
    "lora": dict(lora={"r": 4, "alpha": 8}),
    "lora_rslora_gaussian": dict(lora={"r": 2, "lora_alpha": 4, "use_rslora": True, "init_lora_weights": "gaussian"}),
}


def ids(batch=2, length=12, seed=1):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def mode_options(family: str, mode: str) -> dict:
    opts = MODES[mode]
    if mode == "attn_out":  # the attention output projection under each family's name
        name = {"gpt2": "attn.c_proj", "gpt_neox": "attention.dense"}.get(family, "self_attn.o_proj")
        opts = dict(train_modules=[name])
    return opts


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", FAMILIES + ["mixtral", "gpt_neox"])
def test_identity_at_init_every_mode(family, mode):
    anchor = tiny_model(family, seed=3)
    c = Composer(anchor, strategy="block_expand", num_blocks=2, **mode_options(family, mode))
    x = ids()
    with torch.no_grad():
        assert torch.equal(anchor(x).logits, c.model(x).logits)
    assert c.trainable_parameters()


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_lora_on_zeroed_output_projection_starts_at_zero_and_learns(random_ids, init):
    """Adapters only on the zeroed output projections: B = 0 keeps the identity, and they still train."""
    anchor = tiny_model("llama", seed=4)
    lora = {"r": 4, "target_modules": ["o_proj", "down_proj"], "init_lora_weights": init}
    c = Composer(anchor, strategy="block_expand", num_blocks=2, lora=lora)
    blocks = arch.get_blocks(c.model)
    for i in c.strategy.inserted:
        for path in ("self_attn.o_proj", "mlp.down_proj"):
            layer = blocks[i].get_submodule(path)
            assert torch.count_nonzero(layer.get_base_layer().weight) == 0
            assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
            assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
    x = ids()
    with torch.no_grad():
        assert torch.equal(anchor(x).logits, c.model(x).logits)
    c.fit(random_ids(8, 20), max_steps=2, **FIT)
    with torch.no_grad():
        assert not torch.allclose(anchor(x).logits, c.model(x).logits)


def test_lora_adapters_are_deterministic():
    a = Composer(tiny_model("qwen2", seed=1), strategy="block_expand", num_blocks=2, lora={"r": 4})
    b = Composer(tiny_model("qwen2", seed=1), strategy="block_expand", num_blocks=2, lora={"r": 4})
    pa, pb = a.trainable_parameters(), b.trainable_parameters()
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("mode", ["mlp", "lora"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_only_declared_parameters_train(family, mode, random_ids, tmp_path):
    c = Composer(tiny_model(family, seed=7), strategy="block_expand", num_blocks=2, **mode_options(family, mode))
    trainable = set(c.trainable_parameters())
    prefix = tuple(f"{arch.get_family(c.model).blocks}.{i}." for i in c.strategy.inserted)
    assert trainable and all(k.startswith(prefix) for k in trainable)
    if mode == "lora":
        assert all(".lora_A." in k or ".lora_B." in k for k in trainable)
    else:
        assert all(".mlp." in k for k in trainable)
        # the other parameters of the new blocks exist and are frozen
        assert any(k.startswith(prefix) and ".mlp." not in k for k in params(c.model))
    before = params(c.model)
    c.fit(random_ids(8, 20), max_steps=3, output_dir=str(tmp_path), **FIT)
    after = params(c.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable, sorted(changed - trainable)
    opt = load_file(next((tmp_path / "checkpoints").iterdir()) / "optimizer.safetensors")
    assert {k.rsplit("::", 1)[0] for k in opt} == trainable
    saved = load_file(next((tmp_path / "checkpoints").iterdir()) / "trainable.safetensors")
    assert set(saved) == trainable


def test_train_modules_wildcards_and_strings():
    c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=1, train_modules="mlp.*_proj,o_proj")
    names = {k.split(".", 3)[3] for k in c.trainable_parameters()}
    assert names == {
        f"{m}.{p}"
        for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.o_proj")
        for p in ("weight", "bias")
    }
    plain = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=1)
    for every in ("all", ["all"]):
        c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=1, train_modules=every)
        assert set(c.trainable_parameters()) == set(plain.trainable_parameters())


def test_lora_inside_train_modules_only():
    c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=1, train_modules=["self_attn"], lora={"r": 2})
    adapted = {k.split(".")[4] for k in c.trainable_parameters()}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.parametrize("bias,expected", [("lora_only", {"o_proj", "down_proj"}), ("all", None)])
def test_lora_bias_options(bias, expected):
    c = Composer(
        tiny_model("llama"),
        strategy="block_expand",
        num_blocks=1,
        lora={"r": 2, "target_modules": ["o_proj", "down_proj"], "bias": bias},
    )
    biases = {k.split(".")[4] for k in c.trainable_parameters() if k.endswith("bias")}
    assert biases == (expected or {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_lora_save_is_a_plain_merged_checkpoint(family, random_ids, tmp_path):
    anchor = tiny_model(family, seed=8)
    c = Composer(anchor, strategy="block_expand", num_blocks=2, lora={"r": 4, "alpha": 8, "dropout": 0.1})
    c.fit(random_ids(8, 20), max_steps=3, **FIT)
    out = c.save(tmp_path / "out")
    weights = load_file(out / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in weights)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.num_hidden_layers == 6 and "peft" not in json.dumps(model.config.to_dict())
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    x = ids(2, 10, seed=9)
    with torch.no_grad():
        plain = model.eval()(x).logits
        live = c.model(x).logits
        # W + s*BA in one tensor vs. W x + s*B(A x): equal up to float rounding
        torch.testing.assert_close(plain, live, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain, anchor(x).logits)  # the merge carried the training
    # the live model is not changed by saving
    assert any(".lora_B." in k for k in c.trainable_parameters())
    # Composer.load: the merged weights plus fresh adapters (B = 0): exactly the saved model
    again = Composer.load(out)
    assert set(again.trainable_parameters()) == set(c.trainable_parameters())
    with torch.no_grad():
        assert torch.equal(again.model(x).logits, plain)
    # and compose export writes the same plain checkpoint
    c.strategy.export(c.model, tmp_path / "exported")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_train_modules_save_round_trip(family, random_ids, tmp_path):
    c = Composer(tiny_model(family, seed=2), strategy="block_expand", num_blocks=1, **mode_options(family, "attn_out"))
    c.fit(random_ids(8, 20), max_steps=2, **FIT)
    out = c.save(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    again = Composer.load(out)
    x = ids(2, 10, seed=3)
    with torch.no_grad():
        assert torch.equal(model(x).logits, c.model(x).logits)
        assert torch.equal(again.model(x).logits, c.model(x).logits)
    assert set(again.trainable_parameters()) == set(c.trainable_parameters())
    assert again.config.train_modules == c.config.train_modules


@pytest.mark.parametrize(
    "family,options",
    [("llama", dict(lora={"r": 4, "dropout": 0.1})), ("gpt2", dict(train_modules=["mlp"]))],
    ids=["lora", "train_modules"],
)
def test_killed_and_resumed_equals_uninterrupted(family, options, tmp_path, random_ids):
    data = random_ids(16, 24)
    run = dict(max_steps=5, save_every=2, keep_checkpoints=10, **FIT)

    def fresh():
        return Composer(tiny_model(family, seed=0), strategy="block_expand", num_blocks=2, **options)

    full = fresh().fit(data, output_dir=str(tmp_path / "a"), **run)

    class Killed(Exception):
        pass

    def kill_at_3(step, metrics):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        fresh().fit(data, output_dir=str(tmp_path / "b"), callbacks=[kill_at_3], **run)
    assert latest_checkpoint(tmp_path / "b").name == "step-0000002"
    second = fresh().fit(data, output_dir=str(tmp_path / "b"), resume=True, **run)
    a, b = full.trainable_parameters(), second.trainable_parameters()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = load_file(tmp_path / "a/final/model.safetensors"), load_file(tmp_path / "b/final/model.safetensors")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


# ---------------------------------------------------------------------------- clear errors
def error(match, **options):
    with pytest.raises(ValueError, match=match):
        Composer(tiny_model("llama"), strategy="block_expand", **{"num_blocks": 1, **options})


def test_train_modules_matching_nothing_lists_the_modules():
    error(r"'feed_forward' matches nothing.*mlp\.down_proj.*self_attn\.o_proj", train_modules=["feed_forward"])
    error(r"'mlp\.c_fc' matches nothing", train_modules=["mlp", "mlp.c_fc"])


def test_choices_that_could_never_learn_are_refused():
    # q_proj alone: the copy's outputs stay zero, so its gradient is zero forever
    error(r"output projection.*frozen.*o_proj", train_modules=["self_attn.q_proj"])
    error(r"output projection.*frozen", train_modules=["input_layernorm"])
    error(r"output projection.*frozen", lora={"target_modules": ["q_proj", "v_proj"]})
    error(r"output projection.*frozen", lora={"target_modules": ["q_proj"], "bias": "all"})
    # in lora mode train_modules must hold linear layers
    error(r"'input_layernorm' holds no linear layer", train_modules=["input_layernorm"], lora={})
    error(
        r"'down_proj' matches no linear layer.*inside train_modules",
        train_modules=["self_attn"],
        lora={"target_modules": ["down_proj"]},
    )


@pytest.mark.parametrize(
    "lora,match",
    [
        ({"rank": 4}, r"unknown lora field 'rank'; accepted lora fields: r, alpha, dropout, target_modules"),
        ({"layers_to_transform": [1]}, r"peft LoraConfig field.*not supported on new blocks.*accepted"),
        ({"modules_to_save": ["lm_head"]}, r"'modules_to_save'.*accepted"),
        ({"use_dora": True}, r"use_dora.*zero"),
        ({"init_lora_weights": False}, r"init_lora_weights=False.*identity|init_lora_weights=False.*original"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa'"),
        ({"init_lora_weights": "olora"}, r"init_lora_weights='olora'"),
        ({"init_lora_weights": "loftq"}, r"init_lora_weights='loftq'"),
        ({"init_lora_weights": 1}, r"init_lora_weights=1"),
        ({"r": 0}, r"lora\.r must be a positive integer"),
        ({"r": 4.0}, r"lora\.r must be a positive integer"),
        ({"alpha": float("nan")}, r"lora\.alpha must be a finite number"),
        ({"dropout": 1.0}, r"lora\.dropout must be in \[0, 1\)"),
        ({"use_rslora": "false"}, r"lora\.use_rslora must be true or false, got 'false'"),
        ({"bias": "yes"}, r"lora\.bias must be one of"),
        ({"target_modules": []}, r"lora\.target_modules is an empty list"),
        ({"alpha": 8, "lora_alpha": 8}, r"'alpha' twice"),
        ("r=4", r"lora='r=4' \(str\) is not accepted; expected NewBlockLora or a mapping"),
    ],
)
def test_bad_lora_options(lora, match):
    with pytest.raises(ValueError, match=match):
        BlockExpandConfig(num_blocks=1, lora=lora)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(placement=[1.7]), r"placement=\[1\.7\] is not accepted; expected a string or a list of integers"),
        (dict(placement=[True]), r"placement=\[True\] is not accepted"),
        (dict(placement=["1"]), r"placement=\['1'\] is not accepted"),
        (dict(num_blocks=2.0), r"num_blocks=2\.0 is not accepted; expected an integer >= 1"),
        (dict(num_blocks=True), r"num_blocks=True is not accepted; expected an integer >= 1"),
        (dict(num_blocks=1, placement=5), r"placement=5 is not accepted; expected a string or a list"),
        (dict(num_blocks=1, placement="middle"), r"placement must be one of"),
        (
            dict(num_blocks=1, train_embeddings="no"),
            r"train_embeddings='no' \(str\) is not accepted; expected true/false",
        ),
        (dict(num_blocks=1, train_modules=[]), r"train_modules is an empty list"),
        (dict(num_blocks=1, train_modules=["mlp."]), r"train_modules holds 'mlp\.'"),
        (dict(num_blocks=1, train_modules=3), r"train_modules=3 is not accepted; expected a list of strings"),
    ],
)
def test_bad_options_name_option_and_value(options, match):
    with pytest.raises(ValueError, match=match):
        BlockExpandConfig(**options)


def test_num_blocks_bounded_by_four_per_layer():
    Composer(tiny_model("llama"), strategy="block_expand", num_blocks=16)  # 4 x 4 blocks: the limit
    # refused before any copy is made (10**6 copies used to grow memory without bound)
    error(r"num_blocks=1000000 .* 16", num_blocks=10**6)
    error(r"num_blocks=17", placement=[0] * 17, num_blocks=None)


def test_options_round_trip_through_compose_json(tmp_path):
    cfg = BlockExpandConfig(num_blocks=2, train_modules="mlp", lora={"lora_alpha": 4, "r": 2})
    assert cfg.lora == NewBlockLora(r=2, alpha=4.0)
    again = BlockExpandConfig(**json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_lora_with_gradient_checkpointing_matches(random_ids):
    runs = []
    for gc in (False, True):
        c = Composer(tiny_model("qwen2", seed=9), strategy="block_expand", num_blocks=2, lora={"r": 4})
        c.fit(random_ids(8, 20), max_steps=2, gradient_checkpointing=gc, **FIT)
        runs.append({k: v.detach().clone() for k, v in c.trainable_parameters().items()})
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=1e-5, atol=1e-6)


def test_lora_bf16_model_saves_bf16_merged_copies(random_ids, tmp_path):
    c = Composer(tiny_model("llama", seed=2), strategy="block_expand", num_blocks=1, dtype="bfloat16", lora={"r": 2})
    with torch.no_grad():  # stands in for training: non-zero adapters
        for p in c.trainable_parameters().values():
            p.normal_(std=0.5)
    c.save(tmp_path / "out")
    weights = load_file(tmp_path / "out" / "model.safetensors")
    merged = weights["model.layers.2.self_attn.o_proj.weight"]
    assert merged.dtype == torch.bfloat16 and torch.count_nonzero(merged) > 0
    assert not any("lora" in k for k in weights)


@pytest.mark.slow
def test_forgetting_bench_has_the_lora_row(tmp_path):
    """bench/forgetting_lora.py --quick: the optional demo row runs end to end."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "r.json"
    subprocess.run(
        [sys.executable, str(root / "bench" / "forgetting_lora.py"), "--quick", "--out", str(out)],
        env=child_env(),
        check=True,
        capture_output=True,
    )
    rows = json.loads(out.read_text())["rows"]
    row = next(r for r in rows if "LoRA r=16 on new blocks" in r["method"])
    plain = next(r for r in rows if r["method"].startswith("block_expand") and "LoRA" not in r["method"])
    assert 0 < row["trainable"] < plain["trainable"]


def test_lora_mode_cached_generation_equals_full_forward(random_ids):
    c = Composer(tiny_model("gemma2", seed=6), strategy="block_expand", num_blocks=2, lora={"r": 4})
    c.fit(random_ids(8, 20), max_steps=2, **FIT)
    x = ids(1, 7, seed=8)
    got = c.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = x
    with torch.no_grad():
        for _ in range(6):
            nxt = c.model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(got, seq)
