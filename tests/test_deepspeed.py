"""DeepSpeed ZeRO-2/3 through accelerate, on CPU: 2 processes over gloo, kill -9 + resume, equal to one process.

accelerate 1.x only enters DeepSpeed mode from its GPU launch modes; compose switches a DeepSpeed
launch on a machine without GPUs to DeepSpeed, whose CPU accelerator runs ZeRO over gloo. The
processes are started with the shipped accelerate configs (``launch/zero2.yaml`` and
``zero3.yaml``) plus ``--num_processes 2 --mixed_precision no``. Skipped when deepspeed is not
installed (it is an optional extra: ``pip install 'compose-llm[deepspeed]'``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _launch import ROOT, final_weights, kill_after_checkpoint, run
from safetensors.torch import load_file

from compose import Composer
from compose.testing import tiny_model
from compose.train import TrainConfig, latest_checkpoint, verify_checkpoint

SCRIPT = Path(__file__).parent / "scripts" / "fit_dist.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (optional extra)")


def launch(stage: int) -> list[str]:
    config = ROOT / "launch" / f"zero{stage}.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)] + [
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


def composer(strategy: str) -> Composer:
    """The model fit_dist.py trains, as built before training."""
    if strategy == "calm":
        return Composer(tiny_model("llama", seed=0), tiny_model("llama", seed=1, layers=2), strategy="calm", every=2)
    return Composer(tiny_model("llama", seed=0), strategy="block_expand", num_blocks=2)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process with batch 2 per strategy: what 2 processes x batch 1 must reproduce."""
    out = {}
    for strategy in ("block_expand", "calm"):
        d = tmp_path_factory.mktemp(f"one-{strategy}")
        run([sys.executable, str(SCRIPT), "--out", str(d), "--strategy", strategy, "--steps", "4", "--batch-size", "2"])
        out[strategy] = final_weights(d)
    return out


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("strategy", ["block_expand", "calm"])
def test_zero_kill_resume_equals_uninterrupted_and_single_process(tmp_path, strategy, stage, single):
    args = ["--strategy", strategy, "--steps", "4", "--save-every", "1", "--batch-size", "1"]
    killed = tmp_path / "killed"
    out = kill_after_checkpoint(launch(stage) + [str(SCRIPT), "--out", str(killed), "--sleep", "1.0"] + args, killed)
    assert f"compose: training under DeepSpeed ZeRO-{stage} on 2 processes" in out
    assert not (killed / "final").exists()
    checkpoint = latest_checkpoint(killed)
    assert 2 <= int(checkpoint.name.split("-")[1]) < 4
    verify_checkpoint(checkpoint)
    trainable = set(composer(strategy).trainable_parameters())
    assert set(load_file(checkpoint / "trainable.safetensors")) == trainable  # no frozen weight written
    assert {k.rsplit("::", 1)[0] for k in load_file(checkpoint / "optimizer.safetensors")} == trainable

    resumed_log = run(launch(stage) + [str(SCRIPT), "--out", str(killed), "--resume"] + args)
    assert "compose: resumed from" in resumed_log
    run(launch(stage) + [str(SCRIPT), "--out", str(tmp_path / "whole")] + args)

    resumed, whole, one = final_weights(killed), final_weights(tmp_path / "whole"), single[strategy]
    assert resumed.keys() == whole.keys() == one.keys()
    for k in resumed:
        assert torch.equal(resumed[k], whole[k]), k  # kill + resume = uninterrupted, bit for bit
        # two processes x batch 1 = one process x batch 2, up to the order of fp32 reductions
        torch.testing.assert_close(resumed[k], one[k], rtol=1e-3, atol=2e-4, msg=k)
    if strategy == "block_expand":
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(killed / "final")
        assert loaded.config.num_hidden_layers == 6
        frozen = {k for k in resumed if k.split(":", 1)[1] not in trainable}
        assert frozen and all(torch.equal(resumed[k], one[k]) for k in frozen)  # the anchor is untouched
    else:
        anchor, augment = tiny_model("llama", seed=0), tiny_model("llama", seed=1, layers=2)
        loaded = Composer.load(killed / "final", anchor=anchor, augment=augment)
        ids = torch.randint(3, 96, (1, 8))
        assert torch.isfinite(loaded.model(input_ids=ids).logits).all()


NAN_SCRIPT = """
import sys, torch
from compose import Composer
from compose.testing import tiny_model
torch.set_num_threads(1)
done = {"steps": 0}
def poison(module, args, out):  # the forward of step 2 embeds to NaN (the loss, chunked or not, follows)
    return out * float("nan") if done["steps"] == 1 and torch.is_grad_enabled() else out
c = Composer(tiny_model("llama", seed=0), strategy="block_expand", num_blocks=2)
c.model.get_input_embeddings().register_forward_hook(poison)
rows = [{"input_ids": torch.randint(3, 96, (24,), generator=torch.Generator().manual_seed(i)).tolist()} for i in range(8)]
try:
    c.fit(rows, max_steps=3, learning_rate=1e-2, batch_size=1, seq_len=16, on_nonfinite=sys.argv[2],
          output_dir=sys.argv[1], progress=False, report_to=None, log_every=1,
          callbacks=[lambda step, metrics: done.__setitem__("steps", step)])
except FloatingPointError as e:
    print("compose-test: error:", e, flush=True)
else:
    trained = c.trainable_parameters()
    finite = all(bool(torch.isfinite(p).all()) for p in trained.values())
    skipped = max(h.get("skipped_steps", 0) for h in c.history)  # counted in the entry of the step skipped
    print("compose-test: skipped", skipped, "finite", finite, flush=True)
# leave the process group together: a rank that exits while another still holds it can abort the launch
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
@needs_deepspeed
def test_zero_non_finite_step_is_refused_or_skipped(tmp_path):
    script = tmp_path / "nan.py"
    script.write_text(NAN_SCRIPT)
    out = run(launch(2) + [str(script), str(tmp_path / "skip"), "skip"])
    assert out.count("compose-test: skipped 1 finite True") == 2  # both processes, weights untouched by NaN
    out = run(launch(2) + [str(script), str(tmp_path / "error"), "error"])
    assert "compose-test: error: non-finite training values at step 2" in out


# ---------------------------------------------------------------------------- fast checks (no launch)
def fake_accelerator(ds_config: dict, world: int = 2):
    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=world)


def test_deepspeed_config_is_filled_from_fit_options(monkeypatch):
    from compose.train.distributed import _deepspeed_config

    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}
    config = TrainConfig(batch_size=3, gradient_accumulation_steps=4, max_grad_norm=None)
    assert _deepspeed_config(fake_accelerator(ds), config) == 3
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 3 * 4 * 2 and ds["gradient_clipping"] == 0.0


def test_deepspeed_config_file_disagreeing_with_fit_is_an_error(monkeypatch):
    from compose.train.distributed import _deepspeed_config

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds.json")
    ds = {"train_micro_batch_size_per_gpu": 16, "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match=r"train_micro_batch_size_per_gpu=16 \(fit: 2\).*\"auto\""):
        _deepspeed_config(fake_accelerator(ds), TrainConfig(batch_size=2))
    ds = {"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match="'optimizer' section"):
        _deepspeed_config(fake_accelerator(ds), TrainConfig(batch_size=2))
    with pytest.raises(ValueError, match="ZeRO stage 0.*DDP"):
        _deepspeed_config(fake_accelerator({"zero_optimization": {"stage": 0}}), TrainConfig(batch_size=2))


def test_deepspeed_launch_without_deepspeed_names_the_extra(monkeypatch):
    from accelerate.utils import DistributedType

    from compose.train.distributed import _deepspeed_on_cpu

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    with pytest.raises(ImportError, match=r"compose-llm\[deepspeed\]"):
        _deepspeed_on_cpu(acc)


# ---------------------------------------------------------------------------- on GPUs (pytest -m gpu)
@pytest.mark.gpu
@needs_deepspeed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_bf16_on_two_gpus_resumes_and_saves(tmp_path, stage):
    """The shipped configs as they are meant to run: NCCL, a bf16 engine (fit's mixed_precision='auto')."""
    gpu = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    gpu += [str(ROOT / "launch" / f"zero{stage}.yaml"), "--num_processes", "2"]
    args = ["--strategy", "block_expand", "--steps", "4", "--save-every", "1", "--batch-size", "1"]
    out = run(gpu + [str(SCRIPT), "--out", str(tmp_path / "whole")] + args)
    assert f"compose: training under DeepSpeed ZeRO-{stage} on 2 processes" in out
    import shutil

    part = tmp_path / "part"  # the run as if stopped after checkpoint 2
    shutil.copytree(tmp_path / "whole", part)
    for name in ("checkpoints/step-0000003", "checkpoints/step-0000004", "final"):
        shutil.rmtree(part / name)
    (part / "complete.json").unlink()
    run(gpu + [str(SCRIPT), "--out", str(part), "--resume"] + args)
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(part)
    for k in whole:  # GPU kernels are not bit-deterministic; bf16 compute
        torch.testing.assert_close(resumed[k].float(), whole[k].float(), rtol=2e-2, atol=2e-2, msg=k)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(part / "final").config.num_hidden_layers == 6
