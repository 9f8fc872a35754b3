"""FSDP2 on CPU: 2 processes over gloo under `accelerate launch`, kill -9 + resume, equal to one process.

accelerate 1.x maps an FSDP launch on a machine without GPUs to plain multi-CPU DDP; compose
switches that state back to FSDP2 (``fully_shard`` runs on CPU with gloo), so these tests
exercise the real sharded path: DTensor parameters, gathered full-state checkpoints, re-sharded
resume, and the final model gathered on the main process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compose import Composer
from compose.testing import tiny_model
from compose.train import latest_checkpoint, verify_checkpoint

SCRIPT = Path(__file__).parent / "scripts" / "fit_dist.py"
ROOT = Path(__file__).parents[1]
FSDP = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--use_fsdp",
    "--fsdp_version",
    "2",
    "--fsdp_auto_wrap_policy",
    "TRANSFORMER_BASED_WRAP",
    "--fsdp_state_dict_type",
    "FULL_STATE_DICT",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its workers in their own sessions)."""
    import psutil

    parent = psutil.Process(pid)
    procs = parent.children(recursive=True) + [parent]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def weights(out: Path, strategy: str) -> dict[str, torch.Tensor]:
    files = sorted((out / "final").glob("*.safetensors"))
    assert files, sorted(p.name for p in (out / "final").iterdir())
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("strategy", ["block_expand", "calm"])
def test_fsdp2_kill_resume_equals_uninterrupted_and_single_process(tmp_path, strategy):
    args = ["--strategy", strategy, "--steps", "4", "--save-every", "1", "--batch-size", "1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        FSDP + [str(SCRIPT), "--out", str(killed), "--sleep", "1.0", "--report"] + args,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "step-0000002").exists():
        assert proc.poll() is None, "the FSDP run ended before it could be killed"
        time.sleep(0.05)
    kill_tree(proc.pid)
    out = proc.communicate()[0].decode()
    assert "FSDP" not in out  # killed before the end-of-run report
    assert not (killed / "final").exists()
    step = int(latest_checkpoint(killed).name.split("-")[1])
    assert 2 <= step < 4
    verify_checkpoint(latest_checkpoint(killed))

    report = run(FSDP + [str(SCRIPT), "--out", str(killed), "--resume", "--report"] + args)
    assert "compose-test: " in report and " FSDP" in report  # rank 1's model is an FSDP2 module
    run(FSDP + [str(SCRIPT), "--out", str(tmp_path / "whole")] + args)
    one_args = [a if a != "1" or i != args.index("--batch-size") + 1 else "2" for i, a in enumerate(args)]
    run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "one")] + one_args)

    resumed, whole, one = (weights(tmp_path / d, strategy) for d in ("killed", "whole", "one"))
    assert resumed.keys() == whole.keys() == one.keys()
    for k in resumed:
        assert torch.equal(resumed[k], whole[k]), k  # kill + resume = uninterrupted, bit for bit
        # two processes x batch 1 = one process x batch 2, up to the order of fp32 reductions
        torch.testing.assert_close(resumed[k], one[k], rtol=1e-3, atol=2e-4, msg=k)
    if strategy == "block_expand":
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(killed / "final")
        assert loaded.config.num_hidden_layers == 6
    else:
        anchor, augment = tiny_model("llama", seed=0), tiny_model("llama", seed=1, layers=2)
        loaded = Composer.load(killed / "final", anchor=anchor, augment=augment)
        ids = torch.randint(3, 96, (1, 8))
        assert torch.isfinite(loaded.model(input_ids=ids).logits).all()


@pytest.mark.slow
def test_ddp_streaming_two_shards_kill_resume_equals_uninterrupted(tmp_path):
    """Two processes each streaming their own shard; every checkpoint holds both positions."""
    ddp = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    ddp += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = ["--streaming", "--shards", "2", "--steps", "4", "--save-every", "1", "--batch-size", "1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        ddp + [str(SCRIPT), "--out", str(killed), "--sleep", "1.0"] + args,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "step-0000002").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()
    assert not (killed / "final").exists()
    state = json.loads((latest_checkpoint(killed) / "data.json").read_text())
    assert len(state["ranks"]) == 2  # one position per process (each relative to its own shard)
    run(ddp + [str(SCRIPT), "--out", str(killed), "--resume"] + args)
    run(ddp + [str(SCRIPT), "--out", str(tmp_path / "whole")] + args)
    a, b = weights(killed, "block_expand"), weights(tmp_path / "whole", "block_expand")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
