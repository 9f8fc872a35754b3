"""``lm_eval --model compose`` from lm-evaluation-harness's own command line, on saved tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from compose import Composer
from compose.testing import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a dependency of compose: pip install lm_eval")

TASKS = Path(__file__).resolve().parent / "data" / "lm_eval"
CHOICE = "compose_tiny_choice"

# Runs lm-eval's CLI entry point in a fresh interpreter, so `--model compose` must be found through what
# compose installs (no compose import beforehand). Only the indexing of lm-eval's ~15k built-in task
# configs is skipped (11 s); the tasks asked for are local.
_CLI = """
import sys
import lm_eval.tasks
from functools import partialmethod
lm_eval.tasks.TaskManager.__init__ = partialmethod(lm_eval.tasks.TaskManager.__init__, include_defaults=False)
from lm_eval.__main__ import cli_evaluate
assert "compose.lm_eval_model" not in sys.modules
for args in sys.argv[1].split(" ;; "):
    sys.argv = ["lm_eval", *args.split()]
    cli_evaluate()
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    for name, seed in (("anchor", 0), ("augment", 1)):
        tiny_model("llama", seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    Composer(str(root / "anchor"), strategy="block_expand", num_blocks=2).save(root / "block_expand")
    Composer(str(root / "anchor"), str(root / "augment"), strategy="calm", every=2).save(root / "calm")
    return root


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _args(model_dir: Path, out: Path) -> str:
    return (
        f"--model compose --model_args pretrained={model_dir} --tasks {CHOICE} --include_path {TASKS} "
        f"--device cpu --batch_size 4 --output_path {out}"
    )


def _scores(out: Path) -> dict:
    files = sorted(out.rglob("results_*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_compose_is_declared_as_an_lm_eval_model_plugin():
    found = {ep.name: ep.value for ep in entry_points(group="lm_eval.models")}
    assert found.get("compose") == "compose.lm_eval_model:ComposeLM"


def test_lm_eval_cli_runs_saved_calm_and_block_expansion(saved, tmp_path):
    runs = {name: tmp_path / name for name in ("calm", "block_expand")}
    argv = " ;; ".join(_args(saved / name, out) for name, out in runs.items())
    proc = subprocess.run(
        [sys.executable, "-c", _CLI, argv], cwd=TASKS, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, out in runs.items():
        res = _scores(out)
        assert res["config"]["model"] == "compose" and str(saved / name) in str(res["config"]["model_args"])
        assert res["n-samples"][CHOICE]["effective"] == 8
        assert 0.0 <= res["results"][CHOICE]["acc,none"] <= 1.0


def test_compose_lm_matches_the_harness_on_the_same_model(saved, monkeypatch):
    """The registered model scores exactly what compose's own harness wrapper scores (same HFLM underneath)."""
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from compose.harness import lm_eval

    monkeypatch.chdir(TASKS)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cls = get_model("compose")
    assert cls.__name__ == "ComposeLM"
    lm = cls.create_from_arg_string(f"pretrained={saved / 'calm'}", {"batch_size": 4, "device": "cpu"})
    assert type(lm.composer.model).__name__ == "CalmForCausalLM"
    raw = simple_evaluate(
        model=lm, tasks=[CHOICE], task_manager=TaskManager(include_path=str(TASKS), include_defaults=False)
    )
    direct = lm_eval(Composer.load(saved / "calm"), tasks=[CHOICE], include_path=TASKS, batch_size=4)
    assert raw["results"][CHOICE]["acc,none"] == direct[CHOICE]["acc"]


def test_compose_lm_rejects_base_overrides_on_a_plain_checkpoint(saved):
    from compose.lm_eval_model import ComposeLM

    with pytest.raises(ValueError, match="anchor= / augment= apply to a directory compose wrote"):
        ComposeLM(pretrained=str(saved / "anchor"), anchor=str(saved / "anchor"))


@pytest.mark.slow
def test_the_lm_eval_console_script_finds_compose(saved, tmp_path):
    """The installed `lm_eval` command itself, no patches: the .pth hook or lm-eval's plugin discovery."""
    exe = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run(
        [str(exe), *_args(saved / "calm", tmp_path / "out").split()],
        cwd=TASKS,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _scores(tmp_path / "out")["n-samples"][CHOICE]["effective"] == 8
