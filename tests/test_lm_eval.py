"""lm-evaluation-harness on every strategy's model, with local tasks only (no hub)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from compose import STRATEGIES, Composer
from compose.cli import main
from compose.harness import compact_results, lm_eval
from compose.testing import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a dependency of compose: pip install lm_eval")

TASKS = Path(__file__).resolve().parent / "data" / "lm_eval"
CHOICE, GEN = "compose_tiny_choice", "compose_tiny_gen"


@pytest.fixture(autouse=True)
def offline_local_tasks(monkeypatch):
    # The task YAMLs name their jsonl relative to the working directory.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(TASKS)


def _composer(strategy: str) -> Composer:
    tok = tiny_tokenizer()
    if strategy == "block_expand":
        return Composer(tiny_model("llama"), strategy="block_expand", num_blocks=2, tokenizer=tok)
    if strategy == "lora":
        return Composer(tiny_model("llama"), strategy="lora", r=2, tokenizer=tok)
    if strategy == "full":
        return Composer(tiny_model("llama"), strategy="full", tokenizer=tok)
    if strategy == "calm":
        return Composer(tiny_model("llama"), tiny_model("llama", seed=1), strategy="calm", every=2, tokenizer=tok)
    raise AssertionError(strategy)


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _strategy_module(c: Composer) -> torch.nn.Module:
    """A module holding a trained parameter: it runs only if the harness drives the strategy's
    model (the new blocks, the LoRA adapters, the cross-attentions), not the bare anchor."""
    name = next(iter(c.trainable_parameters())).rpartition(".")[0]
    return c.model.get_submodule(name)


@pytest.fixture(scope="module")
def anchor_scores():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cwd = os.getcwd()
    os.chdir(TASKS)
    try:
        return lm_eval(tiny_model("llama"), tiny_tokenizer(), tasks=[CHOICE, GEN], include_path=TASKS, batch_size=4)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))  # every registered strategy
def test_local_tasks_run_on_every_strategy(strategy, anchor_scores):
    c = _composer(strategy)
    calls = _count_calls(_strategy_module(c))
    scores = lm_eval(c, tasks=f"{CHOICE},{GEN}", include_path=str(TASKS), batch_size=4)
    assert calls[0] > 0, "the harness did not run the strategy's model"
    assert set(scores) == {CHOICE, GEN}
    assert {"acc", "acc_stderr"} <= set(scores[CHOICE]) and "exact_match" in scores[GEN]
    assert scores.raw["n-samples"][CHOICE]["effective"] == 8 and scores.raw["n-samples"][GEN]["effective"] == 8
    for metrics in scores.values():
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics.values())
    # Every strategy starts as the anchor (identity at init; "full" is the anchor), so the
    # harness must score it exactly like the anchor alone.
    assert scores == anchor_scores
    assert not c.model.training


def test_scores_follow_the_model():
    """Loglikelihood accuracy is read off the model: reversing its preference flips the answers."""
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    base = lm_eval(model, tok, tasks=[CHOICE], include_path=TASKS, num_fewshot=0, batch_size=8)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    flat = lm_eval(model, tok, tasks=[CHOICE], include_path=TASKS, num_fewshot=0, batch_size=8)
    # Zero output weights give a uniform next-token distribution, so with one character per
    # token the shortest choice has the highest loglikelihood (ties: the first one).
    docs = [json.loads(line) for line in (TASKS / f"{CHOICE}.jsonl").read_text().splitlines()]
    shortest = [min(range(len(d["choices"])), key=lambda i: len(d["choices"][i])) for d in docs]
    expected = sum(s == d["label"] for s, d in zip(shortest, docs)) / len(docs)
    assert flat[CHOICE]["acc"] == pytest.approx(expected)
    assert base.raw["configs"][CHOICE]["num_fewshot"] == 0


def test_limit_and_fewshot_reach_the_harness():
    scores = lm_eval(tiny_model("gpt2"), tiny_tokenizer(), tasks=[GEN], include_path=TASKS, limit=3, num_fewshot=2)
    assert scores.raw["n-samples"][GEN]["effective"] == 3
    assert scores.raw["n-shot"][GEN] == 2


def test_unknown_task_names_close_matches():
    with pytest.raises(
        ValueError, match=r"unknown lm-evaluation-harness task 'compose_tiny_choise'.*compose_tiny_choice"
    ):
        lm_eval(tiny_model("llama"), tiny_tokenizer(), tasks=["compose_tiny_choise"], include_path=TASKS)


def test_missing_tokenizer_and_bad_paths_are_clear():
    c = Composer(tiny_model("llama"), strategy="full")
    c.tokenizer = None
    with pytest.raises(ValueError, match="needs a tokenizer"):
        lm_eval(c, tasks=[CHOICE], include_path=TASKS)
    with pytest.raises(FileNotFoundError, match="include_path 'no/such/dir' is not a directory"):
        lm_eval(c, tiny_tokenizer(), tasks=[CHOICE], include_path="no/such/dir")
    with pytest.raises(ValueError, match="tasks is empty"):
        lm_eval(c, tiny_tokenizer(), tasks=" , ")


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="pip install lm_eval"):
        lm_eval(tiny_model("llama"), tiny_tokenizer(), tasks=[CHOICE])


def test_compact_results_keeps_named_filters():
    raw = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.01,
                "exact_match,flexible-extract": 0.5,
                "exact_match_stderr,flexible-extract": "N/A",
            },
            "arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75},
        }
    }
    assert compact_results(raw) == {
        "gsm8k": {
            "exact_match,strict-match": 0.25,
            "exact_match,strict-match_stderr": 0.01,
            "exact_match,flexible-extract": 0.5,
        },
        "arc_easy": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.75},
    }


def test_cli_eval_lm_eval(tmp_path, capsys):
    saved = tmp_path / "saved"
    _composer("block_expand").save(saved)
    report = tmp_path / "report.json"
    argv = ["eval", str(saved), "--lm-eval", CHOICE, "--lm-eval", GEN, "--include-path", str(TASKS)]
    assert main(argv + ["--limit", "4", "--num-fewshot", "1", "--batch-size", "4", "--json", str(report)]) == 0
    results = json.loads(report.read_text())["lm_eval"]
    assert set(results) == {CHOICE, GEN} and 0.0 <= results[CHOICE]["acc"] <= 1.0
    assert f"{CHOICE}: acc " in capsys.readouterr().out
    assert main(["eval", str(saved)]) == 1
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", str(saved), "--lm-eval", "compose_tiny_gem", "--include-path", str(TASKS)]) == 1
    assert "did you mean: compose_tiny_gen" in capsys.readouterr().err


def test_tasks_that_run_code_need_confirmation(tmp_path):
    yaml = (TASKS / f"{GEN}.yaml").read_text()
    yaml = yaml.replace(f"task: {GEN}", "task: compose_tiny_unsafe").replace(
        f"test: {GEN}.jsonl", f"test: {TASKS / (GEN + '.jsonl')}"
    )
    (tmp_path / "unsafe.yaml").write_text(yaml + "unsafe_code: true\n")
    args = dict(tasks=["compose_tiny_unsafe"], include_path=tmp_path, limit=2)
    with pytest.raises(ValueError, match="confirm_run_unsafe_code"):
        lm_eval(tiny_model("llama"), tiny_tokenizer(), **args)
    scores = lm_eval(tiny_model("llama"), tiny_tokenizer(), confirm_run_unsafe_code=True, **args)
    assert "exact_match" in scores["compose_tiny_unsafe"]


def test_tokenizer_found_beside_a_saved_model(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    scores = lm_eval(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), tasks=[CHOICE], include_path=TASKS, limit=2)
    assert "acc" in scores[CHOICE]
