"""Resuming: the one rule for what may change (setting by setting), and checkpoints of another model or data."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from compose import Composer
from compose.resume import FIXED
from compose.testing import tiny_model

FIT = dict(
    learning_rate=1e-2, batch_size=2, seq_len=8, progress=False, report_to=None, log_every=1, warmup_ratio=0.0,
    weight_decay=0.1, adam_betas=(0.9, 0.95),
)  # fmt: skip
# a value different from the one in FIT (or from the default) for every fixed setting
CHANGED = {
    "learning_rate": 2e-2,
    "weight_decay": 0.0,
    "adam_betas": (0.8, 0.9),
    "adam_eps": 1e-6,
    "lr_scheduler": "linear",
    "warmup_ratio": 0.2,
    "min_lr_ratio": 0.1,
    "batch_size": 3,
    "gradient_accumulation_steps": 2,
    "seq_len": 12,
    "seed": 1,
    "packing": False,
    "mask_prompt": False,
    "text_field": "body",
    "reset_position_ids": True,
    "streaming": True,
}


def _data(seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 96, (20,), generator=g).tolist()} for _ in range(8)]


def _composer(seed: int = 0):
    return Composer(tiny_model("llama", seed=seed), strategy="block_expand", num_blocks=1)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run of max_steps=4 killed at step 3, after its checkpoint at step 2."""
    out = tmp_path_factory.mktemp("resume") / "run"

    class Stop(Exception):
        pass

    def stop(step, _):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        _composer().fit(_data(), max_steps=4, output_dir=str(out), save_every=2, callbacks=[stop], **FIT)
    return out


@pytest.fixture
def run_dir(interrupted, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(interrupted, dst)
    return dst


def test_every_fixed_setting_has_a_changed_value():
    assert set(CHANGED) == set(FIXED)


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_a_changed_fixed_setting_is_refused_by_name(run_dir, name):
    before = (run_dir / "metrics.jsonl").read_text()
    options = {**FIT, name: CHANGED[name]}
    with pytest.raises(ValueError, match=rf"differ from the interrupted run: {name} \(.*checkpoint's values"):
        _composer().fit(_data(), max_steps=4, output_dir=str(run_dir), resume=True, **options)
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_several_changed_settings_are_all_named(run_dir):
    options = {**FIT, "learning_rate": 5e-3, "weight_decay": 0.0, "adam_betas": (0.5, 0.9)}
    with pytest.raises(ValueError) as e:
        _composer().fit(_data(), max_steps=4, output_dir=str(run_dir), resume=True, **options)
    for name in ("learning_rate (0.01 -> 0.005)", "weight_decay (0.1 -> 0.0)", "adam_betas"):
        assert name in str(e.value)


def test_max_steps_may_grow_and_the_schedule_follows(run_dir):
    with pytest.warns(UserWarning, match="max_steps 4 -> 6: the learning-rate schedule"):
        c = _composer().fit(_data(), max_steps=6, output_dir=str(run_dir), resume=True, **FIT)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert c.history[-1]["step"] == 6


def test_max_steps_at_or_below_the_checkpoint_is_refused(run_dir):
    with pytest.raises(ValueError, match="already at step 2; give max_steps above 2"):
        _composer().fit(_data(), max_steps=2, output_dir=str(run_dir), resume=True, **FIT)


@pytest.mark.parametrize(
    "name, value",
    [("max_grad_norm", None), ("log_every", 2), ("eval_every", 1), ("keep_checkpoints", 1), ("chunked_loss", False)],
)
def test_other_settings_take_their_new_value(run_dir, name, value):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = _composer().fit(_data(), max_steps=4, output_dir=str(run_dir), resume=True, **{**FIT, name: value})
    assert c.history[-1]["step"] == 4
    if name == "max_grad_norm":  # no clipping: no gradient norm is logged
        assert "grad_norm" not in c.history[-1]


def test_resume_onto_another_anchor_of_the_same_architecture_is_refused(run_dir):
    with pytest.raises(ValueError, match=r"another model \(anchor\): the checkpoint was trained on .*fingerprint"):
        _composer(seed=1).fit(_data(), max_steps=4, output_dir=str(run_dir), resume=True, **FIT)


def test_resume_with_another_dataset_is_refused(run_dir):
    with pytest.raises(ValueError, match=r"another training data: .*a list of 8 records.*fingerprint"):
        _composer().fit(_data(seed=5), max_steps=4, output_dir=str(run_dir), resume=True, **FIT)


def test_the_same_anchor_in_bf16_still_resumes(run_dir):
    import torch

    c = Composer(tiny_model("llama", seed=0), strategy="block_expand", num_blocks=1, dtype=torch.bfloat16)
    c.fit(_data(), max_steps=4, output_dir=str(run_dir), resume=True, **FIT)
    assert c.history[-1]["step"] == 4


def test_restart_from_step_0_drops_a_killed_runs_metrics(tmp_path):
    out = tmp_path / "run"

    class Killed(Exception):
        pass

    def kill(step, _):
        if step == 2:
            raise Killed

    with pytest.raises(Killed):  # killed before its first checkpoint (max_steps=3, no save_every)
        _composer().fit(_data(), max_steps=3, output_dir=str(out), callbacks=[kill], **FIT)
    assert (out / "metrics.jsonl").read_text() and not (out / "checkpoints").exists()
    _composer().fit(_data(), max_steps=3, output_dir=str(out), resume=True, **FIT)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_fingerprint_samples_tensors_past_float32_precision():
    """SmolLM2's embedding (49,152 x 576 elements): a float32 linspace of its indices ended one past the last."""
    from compose.resume import _SAMPLE, _tensor_sample

    t = torch.zeros(49_152 * 576, dtype=torch.uint8)
    t[-1] = 7
    sample = _tensor_sample(t)
    assert len(sample) == _SAMPLE * 4 and sample[-4:] != b"\0\0\0\0"  # the last element is sampled
