"""Streaming data: packed on the fly, the same blocks as the prepared path, exact resume; early errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from _launch import child_env
from safetensors.torch import load_file

from compose import Composer
from compose.data import build_blocks, stream_blocks
from compose.testing import tiny_model, tiny_tokenizer
from compose.train import latest_checkpoint

SCRIPT = Path(__file__).parent / "scripts" / "fit_dist.py"
FIT = dict(learning_rate=1e-2, batch_size=2, seq_len=16, warmup_ratio=0.0, progress=False, report_to=None)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def docs(n: int = 30) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": [f"doc {i} " + "abc" * (i % 5) for i in range(n)]})


def test_stream_yields_the_prepared_blocks_in_order_and_resumes_exactly(tok):
    ds = docs()
    prepared = build_blocks(ds, tok, 8)
    stream = stream_blocks(ds.to_iterable_dataset(num_shards=3), tok, 8)
    first = stream.take(7)
    state = stream.state_dict()
    rest = stream.take(len(prepared) - 7)
    assert torch.equal(torch.cat([first["input_ids"], rest["input_ids"]]), prepared.input_ids)
    assert torch.equal(torch.cat([first["labels"], rest["labels"]]), prepared.labels)
    again = stream_blocks(ds.to_iterable_dataset(num_shards=3), tok, 8)
    again.load_state_dict(state)
    assert torch.equal(again.take(len(prepared) - 7)["input_ids"], rest["input_ids"])
    # past the end the stream starts a new epoch from the first block
    assert torch.equal(stream.take(2)["input_ids"], prepared.input_ids[:2]) and stream.epoch == 1


def test_streaming_fit_resumes_across_an_epoch_to_the_same_weights(tmp_path, random_ids):
    rows = datasets.Dataset.from_dict({"input_ids": [r["input_ids"] for r in random_ids(6, 24)]})

    def fresh():
        return Composer(tiny_model("llama", seed=0), strategy="block_expand", num_blocks=1)

    whole = fresh().fit(rows.to_iterable_dataset(), max_steps=8, streaming=True, **FIT)

    class Killed(Exception):
        pass

    def kill_at_6(step, metrics):
        if step == 6:
            raise Killed

    out = str(tmp_path / "run")
    with pytest.raises(Killed):
        fresh().fit(rows.to_iterable_dataset(), max_steps=8, streaming=True, output_dir=out, save_every=5,
                    callbacks=[kill_at_6], **FIT)  # fmt: skip
    assert latest_checkpoint(out).name == "step-0000005"  # 9 blocks, 2 per step: step 5 is in epoch 2
    resumed = fresh().fit(rows.to_iterable_dataset(), max_steps=8, streaming=True, output_dir=out, resume=True, **FIT)
    a, b = whole.trainable_parameters(), resumed.trainable_parameters()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_streaming_sigkill_then_resume_is_bit_identical(tmp_path):
    env = child_env(OMP_NUM_THREADS="1")
    args = [sys.executable, str(SCRIPT), "--streaming", "--shards", "1", "--steps", "6", "--save-every", "1"]
    out = tmp_path / "run"
    proc = subprocess.Popen(args + ["--out", str(out), "--sleep", "0.4"], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step-0000003").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert int(latest_checkpoint(out).name.split("-")[1]) < 6 and not (out / "final").exists()
    subprocess.run(args + ["--out", str(out), "--resume"], env=env, check=True, stderr=subprocess.DEVNULL)
    subprocess.run(args + ["--out", str(tmp_path / "ref")], env=env, check=True, stderr=subprocess.DEVNULL)
    a = load_file(out / "final" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- bad input, before step 1
def fit_fails(tmp_path, data, error, match, **options):
    c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=1, tokenizer=tiny_tokenizer())
    steps = []
    with pytest.raises(error, match=match):
        c.fit(data, max_steps=2, output_dir=str(tmp_path / "out"), callbacks=[lambda s, m: steps.append(s)],
              **{**FIT, **options})  # fmt: skip
    assert steps == [] and not (tmp_path / "out" / "checkpoints").exists()


def test_streaming_without_a_text_column_is_an_early_error(tmp_path):
    data = datasets.Dataset.from_dict({"content": ["a b c"] * 4}).to_iterable_dataset()
    fit_fails(tmp_path, data, ValueError, r"no 'text' column \(columns: content\); set text_field", streaming=True)


def test_more_processes_than_shards_is_an_early_error(tok):
    with pytest.raises(ValueError, match=r"1 shard\(s\) \(files\) for 2 processes"):
        stream_blocks(docs().to_iterable_dataset(num_shards=1), tok, 8, rank=0, world=2)


@pytest.mark.parametrize("num_proc", [0, -1])
def test_num_proc_must_be_positive(tmp_path, num_proc):
    with pytest.raises(ValueError, match=f"num_proc={num_proc} is not accepted; expected an integer >= 1"):
        Composer(tiny_model("llama"), strategy="block_expand", num_blocks=1).fit(["a"], num_proc=num_proc, **FIT)


def test_unwritable_cache_dir_is_an_early_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = str(blocker / "cache")
    fit_fails(tmp_path, ["abc abc"] * 4, PermissionError, "data cache directory .* is not writable", data_cache_dir=bad)
    fit_fails(tmp_path, docs().to_iterable_dataset(), PermissionError, "set data_cache_dir", data_cache_dir=bad,
              streaming=True)  # fmt: skip


def test_streaming_a_jsonl_file(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(f'{{"text": "line {i}"}}\n' for i in range(5)))
    stream = stream_blocks(str(path), tok, 8)
    assert torch.equal(stream.take(3)["input_ids"], build_blocks(str(path), tok, 8).input_ids[:3])
