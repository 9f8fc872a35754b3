"""Training loop: resume after a kill, distributed run, schedule (issue 2)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _launch import child_env
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compose import Composer
from compose.evaluate import packed_loss
from compose.testing import tiny_model
from compose.train import TrainConfig, latest_checkpoint, make_scheduler

SCRIPT = Path(__file__).parent / "scripts" / "fit_tiny.py"
FIT = dict(
    log_every=1, learning_rate=1e-2, batch_size=2, seq_len=16, warmup_ratio=0.0, progress=False, keep_checkpoints=100
)


def trained(c):
    return {k: v.detach().clone() for k, v in c.trainable_parameters().items()}


def test_killed_and_resumed_equals_uninterrupted(tmp_path, random_ids):
    data = random_ids(16, 32)
    full = Composer(tiny_model("llama", seed=0), strategy="block_expand", num_blocks=2)
    full.fit(data, max_steps=6, output_dir=str(tmp_path / "a"), save_every=2, **FIT)

    class Killed(Exception):
        pass

    def kill_at_5(step, metrics):
        if step == 5:
            raise Killed

    first = Composer(tiny_model("llama", seed=0), strategy="block_expand", num_blocks=2)
    with pytest.raises(Killed):
        first.fit(data, max_steps=6, output_dir=str(tmp_path / "b"), save_every=2, callbacks=[kill_at_5], **FIT)
    assert latest_checkpoint(tmp_path / "b").name == "step-0000004"
    assert not (tmp_path / "b" / "final").exists()

    second = Composer(tiny_model("llama", seed=0), strategy="block_expand", num_blocks=2)
    second.fit(data, max_steps=6, output_dir=str(tmp_path / "b"), save_every=2, resume=True, **FIT)
    a, b = trained(full), trained(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the resumed run really continued (it did not just redo everything from scratch)
    # metrics of the killed run after its last checkpoint are dropped: the log reads as one run
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_sigkill_mid_run_then_resume(tmp_path):
    out = tmp_path / "run"
    env = child_env()
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--out", str(out), "--steps", "8", "--save-every", "1", "--sleep", "0.4"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step-0000003").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) < 8
    assert not (out / "final").exists()
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--steps", "8", "--save-every", "1", "--resume"],
        env=env,
        check=True,
        stderr=subprocess.DEVNULL,
    )
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "ref"), "--steps", "8", "--save-every", "1"],
        env=env,
        check=True,
        stderr=subprocess.DEVNULL,
    )
    a = load_file(out / "final" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_settings_is_refused(tmp_path, random_ids):
    data = random_ids(8, 32)
    Composer(tiny_model("llama"), strategy="block_expand", num_blocks=1).fit(
        data, max_steps=2, output_dir=str(tmp_path), **FIT
    )
    c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=1)
    with pytest.raises(ValueError, match="differ from the interrupted run: batch_size"):
        c.fit(data, max_steps=2, output_dir=str(tmp_path), resume=True, **{**FIT, "batch_size": 4})


def test_resume_from_other_model_is_refused(tmp_path, random_ids):
    data = random_ids(8, 32)
    Composer(tiny_model("llama"), strategy="block_expand", num_blocks=1).fit(
        data, max_steps=2, output_dir=str(tmp_path), **FIT
    )
    c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=2)
    with pytest.raises(ValueError, match="do not match the model being trained"):
        c.fit(data, max_steps=2, output_dir=str(tmp_path), resume=True, **FIT)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warmup_then_decay_to_the_floor(kind):
    cfg = TrainConfig(max_steps=100, warmup_ratio=0.1, lr_scheduler=kind, min_lr_ratio=0.1, learning_rate=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, cfg)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # linear with a floor is transformers' warmup_stable_decay, whose warmup starts at the floor
    assert lrs[0] == (0.1 if kind == "linear" else 0.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1.0 if kind == "constant" else 0.1, abs=0.02)
    assert min(lrs[10:]) >= (1.0 if kind == "constant" else 0.1) - 1e-9


def test_eval_loss_logged(random_ids):
    c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=1)
    c.fit(random_ids(8, 32), eval_data=random_ids(2, 32, seed=5), max_steps=4, eval_every=2, **FIT)
    evals = [h for h in c.history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert evals[-1]["eval_loss"] == pytest.approx(
        packed_loss(c, random_ids(2, 32, seed=5), seq_len=16)["loss"], rel=1e-5
    )


def test_ddp_two_processes_matches_single(tmp_path):
    """Two processes under `accelerate launch` on a CPU machine: DDP over gloo, same checkpoint format.

    accelerate 1.x starts a single process for `--cpu --num_processes 2` (its `--cpu` path is
    for MPI); `--multi_gpu` starts two through torchrun, and compose joins them in a gloo group
    when no GPU is present. Two processes x batch 1 must equal one process x batch 2.
    """
    env = child_env(OMP_NUM_THREADS="1")
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    subprocess.run(
        launcher + [str(SCRIPT), "--out", str(tmp_path / "ddp"), "--steps", "4", "--batch-size", "1"],
        env=env,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "one"), "--steps", "4", "--batch-size", "2"],
        env=env,
        check=True,
        capture_output=True,
    )
    ddp = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "final")
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final")
    assert ddp.config.num_hidden_layers == 6
    for (n, a), (_, b) in zip(ddp.state_dict().items(), one.state_dict().items()):
        # AdamW divides by sqrt(v): float reordering in the all-reduce shows up around 1e-4
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4, msg=n)
    assert latest_checkpoint(tmp_path / "ddp").name == "step-0000004"
    assert Composer.load(tmp_path / "ddp" / "final").strategy.inserted == [2, 5]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma", "mixtral"])
def test_chunked_loss_equals_model_loss(family):
    """The chunked LM-head loss (default) gives the model's own loss and gradients."""
    from compose.data import IGNORE
    from compose.train import ChunkedLoss

    model = Composer(tiny_model(family, seed=1), strategy="full").model.train()
    assert ChunkedLoss.supports(model)
    x = torch.randint(3, 96, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = x.clone()
    labels[0, :7] = IGNORE
    batch = {"input_ids": x, "labels": labels, "attention_mask": torch.ones_like(x)}
    params = [p for p in model.parameters() if p.requires_grad]
    want = model(**batch).loss
    got = ChunkedLoss(model, chunk=7)(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # float summation order
    assert model.get_output_embeddings() is not None  # head restored after the call


def test_chunked_loss_not_used_where_logits_are_not_head_output():
    from compose.train import ChunkedLoss

    assert not ChunkedLoss.supports(tiny_model("gemma2"))  # final logit soft-capping
    assert not ChunkedLoss.supports(torch.nn.Linear(2, 2))


def test_two_stage_recipe_with_different_precisions_runs_in_one_call(tmp_path):
    from compose.recipe import run_recipe

    recipe = Path(__file__).parents[1] / "recipes" / "tiny" / "two_stage.yaml"
    results = run_recipe(recipe, [f"output.dir={tmp_path}", "train.max_steps=2"], log=lambda *a, **k: None)
    assert list(results) == ["fp32", "bf16"]
    for stage in results.values():
        assert [h["step"] for h in stage["history"]][-1] == 2
        assert all(math.isfinite(h["loss"]) for h in stage["history"])
        assert Path(stage["output"]).is_dir()
    from accelerate.state import AcceleratorState

    assert AcceleratorState().mixed_precision == "bf16"
