"""``report_to``: tensorboard, wandb and mlflow through accelerate, offline; they log what metrics.jsonl holds."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from compose import Composer
from compose.recipe import RecipeError, check_recipe
from compose.testing import tiny_model
from compose.validation import OptionError

TINY_DATA = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "data"
FIT = dict(max_steps=3, batch_size=2, seq_len=16, log_every=1, warmup_ratio=0.0, progress=False, learning_rate=1e-2)


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 90, (20,), generator=g).tolist()} for _ in range(n)]


def _fit(out: Path, report_to) -> list[dict]:
    data = _data()
    Composer(tiny_model("llama"), strategy="block_expand", num_blocks=1).fit(
        data, data[:2], output_dir=str(out), report_to=report_to, **FIT
    )
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same(logged: dict[int, dict], jsonl: list[dict]) -> None:
    """Every metrics.jsonl entry, at its step, with the same keys and values (float32 trackers: approx)."""
    assert sorted(logged) == [e["step"] for e in jsonl]
    for entry in jsonl:
        want = {k: v for k, v in entry.items() if k != "step"}
        got = logged[entry["step"]]
        assert set(got) == set(want), (entry["step"], got, want)
        assert got == pytest.approx(want, rel=1e-6)
    assert any("eval_loss" in e for e in jsonl)


# ---------------------------------------------------------------------------- the names
@pytest.mark.parametrize("bad", ["tensorbord", ["wandb", "neptune"], "tensorboard,mlfow"])
def test_unknown_tracker_is_an_error_listing_the_accepted(bad, tmp_path):
    with pytest.raises(OptionError, match="tensorboard, wandb, mlflow") as e:
        Composer(tiny_model("llama"), strategy="full").fit(
            _data(), output_dir=str(tmp_path / "o"), **{**FIT, "report_to": bad}
        )
    assert "report_to" in str(e.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", [5, ["wandb", 3]])
def test_report_to_of_the_wrong_type_is_an_error(bad):
    with pytest.raises(OptionError, match="report_to"):
        Composer(tiny_model("llama"), strategy="full").fit(_data(), **{**FIT, "report_to": bad})


def test_recipe_report_to_is_checked_by_compose_check(tmp_path):
    recipe = {
        "anchor": "tiny:llama?hidden=32&layers=2",
        "strategy": "full",
        "data": {"train": str(TINY_DATA / "code.txt"), "seq_len": 16},
        "train": {"max_steps": 1, "report_to": ["tensorboard", "wandbb"]},
        "output": {"dir": str(tmp_path / "run")},
    }
    with pytest.raises(RecipeError, match="train: .*'wandbb', which is not a tracker"):
        check_recipe(recipe)
    recipe["train"]["report_to"] = "tensorboard,mlflow"
    check_recipe(recipe)


def test_a_tracker_that_is_not_installed_says_what_to_install(tmp_path, monkeypatch):
    import compose.trackers

    monkeypatch.setattr(compose.trackers, "_installed", lambda name: name != "wandb")
    with pytest.raises(OptionError, match="pip install wandb"):
        _fit(tmp_path / "o", ["tensorboard", "wandb"])


def test_tensorboard_needs_an_output_dir():
    with pytest.raises(OptionError, match="set output_dir"):
        Composer(tiny_model("llama"), strategy="full").fit(_data(), **{**FIT, "report_to": "tensorboard"})


def test_no_tracker_writes_no_tracker_files(tmp_path):
    _fit(tmp_path / "o", None)
    assert not (tmp_path / "o" / "compose").exists() and not (tmp_path / "o" / "wandb").exists()


# ---------------------------------------------------------------------------- each tracker, offline
def test_tensorboard_logs_the_metrics_jsonl_entries(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install 'compose-llm[trackers]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    jsonl = _fit(tmp_path / "o", "tensorboard")
    logged: dict[int, dict] = {}
    for events in (tmp_path / "o" / "compose").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for ev in acc.Scalars(tag):
                logged.setdefault(ev.step, {})[tag] = ev.value
    _same(logged, jsonl)


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file (leveldb log format: 32 KiB blocks, 7-byte record headers)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            out.append(chunk)
            chunk = b""
    return out


def test_wandb_offline_logs_the_metrics_jsonl_entries(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed: pip install 'compose-llm[trackers]'")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "compose-test")
    jsonl = _fit(tmp_path / "o", ["wandb"])
    (run_file,) = (tmp_path / "o" / "wandb").glob("offline-run-*/run-*.wandb")  # inside the run's directory
    logged: dict[int, dict] = {}
    project = None
    for raw in _wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            project = record.run.project
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            logged[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
    assert project == "compose-test"
    _same(logged, jsonl)


def test_mlflow_file_store_logs_the_metrics_jsonl_entries(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'compose-llm[trackers]'")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    jsonl = _fit(tmp_path / "o", "mlflow")
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("compose").experiment_id])
    assert run.data.params["max_steps"] == "3"
    logged: dict[int, dict] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            logged.setdefault(m.step, {})[key] = m.value
    _same(logged, jsonl)
