"""Faults inside the training loop: damaged checkpoints, non-finite values, Ctrl-C, kill -9 at
every point of a save, precision switches between runs, bf16 frozen weights on CPU."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _launch import child_env
from safetensors.torch import load_file

from compose import STRATEGIES, Composer
from compose.testing import tiny_model
from compose.train import CheckpointError, latest_checkpoint, verify_checkpoint

FIT = dict(log_every=1, learning_rate=1e-2, batch_size=2, seq_len=16, warmup_ratio=0.0, progress=False, report_to=None)


def fresh(strategy: str = "block_expand", **kwargs) -> Composer:
    if strategy == "calm":
        return Composer(tiny_model("llama", seed=0), tiny_model("llama", seed=1, layers=2), strategy="calm", every=2)
    options = {"block_expand": {"num_blocks": 1}, "lora": {"r": 2}, "full": {}}[strategy]
    return Composer(tiny_model("llama", seed=0), strategy=strategy, **options, **kwargs)


def same(a: Composer, b: Composer) -> bool:
    x, y = a.trainable_parameters(), b.trainable_parameters()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture
def data(random_ids):
    return random_ids(12, 24)


@pytest.fixture
def reference(data):
    return fresh().fit(data, max_steps=4, **FIT)


# ---------------------------------------------------------------------------- damaged checkpoints
def test_flipped_byte_falls_back_to_the_previous_checkpoint(tmp_path, data, reference):
    out = tmp_path / "run"
    fresh().fit(data, max_steps=4, output_dir=str(out), save_every=1, keep_checkpoints=10, **FIT)
    bad = out / "checkpoints" / "step-0000004" / "trainable.safetensors"
    raw = bytearray(bad.read_bytes())
    raw[-3] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="step-0000004/trainable.safetensors does not match its checksum"):
        verify_checkpoint(bad.parent)
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint: .*step-0000004/trainable.safetensors"):
        resumed = fresh().fit(data, max_steps=4, output_dir=str(out), resume=True, save_every=1, **FIT)
    assert same(resumed, reference)  # step 4 was redone from step 3
    verify_checkpoint(latest_checkpoint(out))  # and rewritten whole


def test_truncated_file_named_and_never_unpickled(tmp_path, data):
    out = tmp_path / "run"
    fresh().fit(data, max_steps=2, output_dir=str(out), save_every=1, **FIT)
    for ckpt in (out / "checkpoints").iterdir():
        path = ckpt / "optimizer.safetensors"
        path.write_bytes(path.read_bytes()[:50])
    explicit = out / "checkpoints" / "step-0000002"
    with pytest.raises(CheckpointError, match="step-0000002/optimizer.safetensors does not match") as info:
        fresh().fit(data, max_steps=2, output_dir=str(out), resume=str(explicit), **FIT)
    assert "weights_only" not in str(info.value) and "pickle" not in str(info.value).lower()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no usable checkpoint to resume from"):
        fresh().fit(data, max_steps=2, output_dir=str(out), resume=True, **FIT)


def test_checkpoint_holds_no_pickles(tmp_path, data):
    out = tmp_path / "run"
    fresh().fit(data, max_steps=1, output_dir=str(out), **FIT)
    names = sorted(p.name for p in latest_checkpoint(out).iterdir())
    assert not [n for n in names if n.endswith((".pt", ".bin", ".pkl"))], names
    assert "manifest.json" in names and "optimizer.safetensors" in names and "data.json" in names


# ---------------------------------------------------------------------------- non-finite values
def test_nonfinite_loss_stops_naming_the_step_and_saves_nothing(tmp_path, data):
    c = fresh()
    with torch.no_grad():
        next(iter(c.trainable_parameters().values())).view(-1)[0] = float("nan")
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="non-finite training values at step 1"):
        c.fit(data, max_steps=3, output_dir=str(out), save_every=1, **FIT)
    assert latest_checkpoint(out) is None and not (out / "final").exists()


def test_skip_counts_steps_and_never_saves_nonfinite_weights(tmp_path, data):
    c = fresh()
    with torch.no_grad():
        next(iter(c.trainable_parameters().values())).view(-1)[0] = float("inf")
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="non-finite values after step 1: checkpoint not written"):
        c.fit(data, max_steps=3, output_dir=str(out), save_every=1, on_nonfinite="skip", **FIT)
    assert latest_checkpoint(out) is None
    c = fresh()
    with torch.no_grad():
        next(iter(c.trainable_parameters().values())).view(-1)[0] = float("inf")
    c.fit(data, max_steps=3, on_nonfinite="skip", **FIT)  # nothing on disk: the run goes on, skipping
    assert [h.get("skipped_steps") for h in c.history] == [1, 2, 3]


def test_exploding_learning_rate_stops_before_bad_weights_are_written(tmp_path, data):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"step \d"):
        fresh().fit(data, max_steps=4, output_dir=str(out), save_every=1, **{**FIT, "learning_rate": 1e30})
    assert not (out / "final").exists()
    for ckpt in (out / "checkpoints").glob("step-*"):
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "trainable.safetensors").values())


# ---------------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize("how", ["signal", "exception"])
def test_ctrl_c_writes_a_checkpoint_at_the_step_then_reraises(tmp_path, data, reference, how):
    def interrupt(step, metrics):
        if step == 2:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGINT)  # deferred to the end of the step
            else:
                raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fresh().fit(data, max_steps=4, output_dir=str(out), callbacks=[interrupt], **FIT)
    assert latest_checkpoint(out).name == "step-0000002"
    verify_checkpoint(latest_checkpoint(out))
    resumed = fresh().fit(data, max_steps=4, output_dir=str(out), resume=True, **FIT)
    assert same(resumed, reference)


# ---------------------------------------------------------------------------- precision
def test_two_fits_with_different_mixed_precision_in_one_process(data):
    c = fresh()
    c.fit(data, max_steps=1, mixed_precision="no", **FIT)
    c.fit(data, max_steps=1, mixed_precision="bf16", **FIT)
    from accelerate.state import AcceleratorState

    assert AcceleratorState().mixed_precision == "bf16"
    c.fit(data, max_steps=1, mixed_precision="no", **FIT)
    assert all(torch.isfinite(p).all() for p in c.trainable_parameters().values())


def test_precision_change_without_accelerates_reset_is_a_clear_error(data, monkeypatch, tmp_path):
    """An accelerate that drops its private reset: a second precision in one process fails before writing."""
    from accelerate.state import AcceleratorState

    c = fresh()
    c.fit(data, max_steps=1, mixed_precision="no", **FIT)
    monkeypatch.delattr(AcceleratorState, "_reset_state")
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="run this fit in a new process"):
        c.fit(data, max_steps=1, mixed_precision="bf16", output_dir=str(out), **FIT)
    assert not out.exists() or not any(out.iterdir())
    c.fit(data, max_steps=1, mixed_precision="no", **FIT)  # the same precision still trains


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))  # every registered strategy
def test_bf16_frozen_weights_train_on_cpu(data, strategy):
    c = fresh(strategy) if strategy == "calm" else fresh(strategy, dtype="bfloat16")
    if strategy == "calm":
        c = Composer(tiny_model("llama", seed=0), tiny_model("llama", seed=1, layers=2), strategy="calm", every=2,
                     dtype="bfloat16")  # fmt: skip
    frozen = {n: p.detach().clone() for n, p in c.model.named_parameters() if not p.requires_grad}
    assert any(p.dtype == torch.bfloat16 for p in frozen.values()) or strategy == "full"
    dtypes = {n: p.dtype for n, p in c.trainable_parameters().items()}
    before = {n: p.detach().float().clone() for n, p in c.trainable_parameters().items()}
    c.fit(data, max_steps=2, **FIT)
    assert all(math.isfinite(h["loss"]) for h in c.history)
    after = dict(c.model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in frozen.items())
    assert any(not torch.equal(after[n].float(), t) for n, t in before.items())  # it trained
    # trained as fp32 masters, handed back in the model's own dtype: it evaluates and generates as is
    assert {n: p.dtype for n, p in c.trainable_parameters().items()} == dtypes
    assert math.isfinite(c.evaluate(data, seq_len=16)["loss"])
    c.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2)


# ---------------------------------------------------------------------------- kill -9 while saving
SCRIPT = Path(__file__).parent / "scripts" / "fit_dist.py"
ENV = child_env(OMP_NUM_THREADS="1")
ARGS = [sys.executable, str(SCRIPT), "--steps", "4", "--save-every", "1"]


def script(out: Path, *extra: str, kill: str | None = None) -> int:
    env = {**ENV, "COMPOSE_TEST_KILL": kill} if kill else ENV
    return subprocess.run(ARGS + ["--out", str(out), *extra], env=env, stderr=subprocess.DEVNULL).returncode


def test_kill_at_every_point_of_a_save_keeps_the_last_good_model(tmp_path):
    from transformers import AutoModelForCausalLM

    assert script(tmp_path / "ref") == 0
    want = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    for point in ("checkpoint-write", "checkpoint-rename", "final-write", "final-rename"):
        out = tmp_path / point
        if point == "final-rename":  # a finished run whose final/ is being rewritten
            assert script(out) == 0
        code = script(out, *(["--resume"] if point == "final-rename" else []), kill=point)
        assert code == -signal.SIGKILL, point
        good = latest_checkpoint(out)
        verify_checkpoint(good)  # the newest visible checkpoint is whole
        assert good.name == ("step-0000002" if point.startswith("checkpoint") else "step-0000004"), point
        if point == "final-rename":  # the previous final, moved aside, is still a loadable model
            (old,) = out.glob(".final.old-*") if not (out / "final").exists() else [out / "final"]
            AutoModelForCausalLM.from_pretrained(old)
        assert script(out, "--resume") == 0, point
        got = load_file(out / "final" / "model.safetensors")
        assert all(torch.equal(got[k], want[k]) for k in want), point
        AutoModelForCausalLM.from_pretrained(out / "final")


def test_checkpoints_without_manifest_are_not_silently_ignored(tmp_path, data):
    old = tmp_path / "run" / "checkpoints" / "step-0000002"
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text('{"step": 2}')
    with pytest.raises(CheckpointError, match=r"without manifest.json \(step-0000002\)"):
        fresh().fit(data, max_steps=2, output_dir=str(tmp_path / "run"), resume=True, **FIT)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        fresh().fit(data, max_steps=2, output_dir=str(tmp_path / "run"), **FIT)
