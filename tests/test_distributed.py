"""FSDP2 on CPU: 2 processes over gloo under `accelerate launch`, kill -9 + resume, equal to one process.

accelerate 1.x maps an FSDP launch on a machine without GPUs to plain multi-CPU DDP; compose
switches that state back to FSDP2 (``fully_shard`` runs on CPU with gloo), so these tests
exercise the real sharded path: DTensor parameters, gathered full-state checkpoints, re-sharded
resume, and the final model gathered on the main process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _launch import final_weights, kill_after_checkpoint, run

from compose import Composer
from compose.testing import tiny_model
from compose.train import latest_checkpoint, verify_checkpoint

SCRIPT = Path(__file__).parent / "scripts" / "fit_dist.py"
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


@pytest.mark.parametrize("strategy", ["block_expand", "calm"])
def test_fsdp2_kill_resume_equals_uninterrupted_and_single_process(tmp_path, strategy):
    args = ["--strategy", strategy, "--steps", "4", "--save-every", "1", "--batch-size", "1"]
    killed = tmp_path / "killed"
    out = kill_after_checkpoint(FSDP + [str(SCRIPT), "--out", str(killed), "--sleep", "1.0", "--report"] + args, killed)
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

    resumed, whole, one = (final_weights(tmp_path / d) for d in ("killed", "whole", "one"))
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
    kill_after_checkpoint(ddp + [str(SCRIPT), "--out", str(killed), "--sleep", "1.0"] + args, killed)
    assert not (killed / "final").exists()
    state = json.loads((latest_checkpoint(killed) / "data.json").read_text())
    assert len(state["ranks"]) == 2  # one position per process (each relative to its own shard)
    run(ddp + [str(SCRIPT), "--out", str(killed), "--resume"] + args)
    run(ddp + [str(SCRIPT), "--out", str(tmp_path / "whole")] + args)
    a, b = final_weights(killed), final_weights(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
