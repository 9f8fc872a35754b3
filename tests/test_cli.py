"""The `compose` command, called in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from compose import Composer
from compose.cli import main
from compose.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"


@pytest.mark.parametrize("command", [None, "train", "eval", "generate", "check", "export"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(([command] if command else []) + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: compose" in out
    if command == "train":
        assert "train.learning_rate" in out and "data.seq_len" in out
        assert "    lora: r (>= 1), alpha (> 0)" in out  # each strategy's options, from the registry
        assert all(f"    {name}: " in out for name in STRATEGIES)


def test_check_reports_every_failure(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text((TINY / "calm.yaml").read_text().replace("strategy: calm", "strategy: calmm"))
    assert main(["check", str(TINY / "calm.yaml"), str(TINY / "block_expand.yaml")]) == 0
    assert main(["check", str(bad), str(TINY / "calm.yaml")]) == 1
    captured = capsys.readouterr()
    assert "unknown strategy 'calmm'" in captured.err and "ok" in captured.out


def test_train_then_load_eval_generate_export(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            str(TINY / "block_expand.yaml"),
            f"output.dir={out}",
            "train.max_steps=2",
            "train.batch_size=2",
            "data.seq_len=32",
            "eval.max_batches=1",
            "eval.plots=false",
        ]
    )
    assert rc == 0
    final = out / "sft" / "final"
    assert (final / "recipe.yaml").is_file() and (final / "results.json").is_file()
    c = Composer.load(final)
    assert c.strategy_name == "full" and c.model.config.num_hidden_layers == 6
    assert c.tokenizer is not None

    report = tmp_path / "eval.json"
    assert main(["eval", str(final), "--data", f"code={TINY / 'data' / 'code.txt'}", "--seq-len", "32",
                 "--max-batches", "1", "--exact-match", str(TINY / "data" / "arithmetic.jsonl"),
                 "--max-new-tokens", "2", "--json", str(report)]) == 0  # fmt: skip
    results = json.loads(report.read_text())
    assert results["perplexity"]["code"]["perplexity"] > 1 and results["exact_match"]["arithmetic"]["total"] == 16

    capsys.readouterr()
    assert main(["generate", str(final), "--prompt", "def f(x):", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def f(x):")

    plain = tmp_path / "plain"
    assert main(["export", str(out / "expand" / "final"), str(plain)]) == 0
    assert not (plain / "compose.json").exists() and (plain / "recipe.yaml").is_file()
    ids = torch.randint(3, 96, (1, 12))
    expanded = Composer.load(out / "expand" / "final")
    with torch.no_grad():
        ref = expanded.model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(plain)(input_ids=ids).logits
    assert torch.equal(got, ref)


def test_export_refuses_calm_and_errors_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "calm"
    assert main(["train", str(TINY / "calm.yaml"), f"output.dir={out}", "train.max_steps=1", "train.batch_size=2",
                 "data.seq_len=16", "eval.perplexity={}", "eval.exact_match={}", "eval.domain=[]", "eval.baseline=false"]) == 0  # fmt: skip
    assert main(["export", str(out / "final"), str(tmp_path / "x")]) == 1
    assert "calm" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere"), "--data", "x.txt"]) == 1
