"""The strategy registry: every strategy declares what compose needs, and a new one works end to end.

A toy strategy registered here (and only here) goes through ``compose check``, ``train``,
``eval`` and ``export`` in-process, touching no other file; every option set of a recipe run
is checked exactly once.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM

from compose import arch
from compose.cli import build_parser, main
from compose.rules import Rule, option, rules_of
from compose.strategies import STRATEGIES, Strategy, StrategyConfig, register, strategy_table, unregister
from compose.strategies.base import shard_options

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ROOT / "recipes" / "tiny" / "data"


# ---------------------------------------------------------------------------- every registered strategy
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_declares_itself(name):
    cls = STRATEGIES[name]
    assert cls.name == name
    assert dataclasses.is_dataclass(cls.config_class) and issubclass(cls.config_class, StrategyConfig)
    assert cls.method and cls.adds and cls.trains and cls.saves, "one line each for the docs' table"
    assert cls.paper is None or cls.paper.startswith("https://arxiv.org/abs/")
    for field_name, rule in rules_of(cls.config_class).items():
        assert isinstance(rule, Rule) and rule.describe(), field_name


def test_docs_strategy_table_is_the_registry():
    text = (ROOT / "docs" / "strategies.md").read_text()
    assert strategy_table() in text, (
        "regenerate the table: python -c 'import compose; print(compose.strategies.strategy_table())'"
    )


def test_help_names_every_strategy(capsys):
    parser = build_parser()
    helps = {command: sub.format_help() for command, sub in parser._subparsers._group_actions[0].choices.items()}  # noqa: SLF001 - argparse has no public accessor for subparsers
    for name in STRATEGIES:
        assert name in parser.format_help()
        assert name in helps["export"]
        assert name in helps["train"]  # the recipe keys list the registered strategies


# ---------------------------------------------------------------------------- a toy strategy, end to end
@dataclasses.dataclass
class ToyConfig(StrategyConfig):
    """Options of ``toy``: train the last ``last_blocks`` blocks."""

    last_blocks: int = option(1, ge=1)
    explode: bool = False


class Toy(Strategy):
    name = "toy"
    method = "toy fine-tuning"
    config_class = ToyConfig
    saves_full_model = True
    adds = "nothing"
    trains = "the last blocks"
    saves = "a plain transformers checkpoint"

    def check(self, model_config: Any) -> None:
        n = arch.num_layers(model_config)
        if self.config.last_blocks > n:
            raise ValueError(f"last_blocks={self.config.last_blocks} is more than the model's {n} blocks")

    def build(self, anchor, augments):
        if self.config.explode:
            raise RuntimeError("toy build failed")
        self._freeze(anchor)
        return anchor

    def _freeze(self, model) -> None:
        model.requires_grad_(False)
        for block in list(arch.get_blocks(model))[-self.config.last_blocks :]:
            block.requires_grad_(True)

    def save(self, model, directory, *, max_shard_size=None):
        model.save_pretrained(directory, safe_serialization=True, **shard_options(max_shard_size))
        return {}

    def load(self, directory, state, anchor, augments):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
        self._freeze(model)
        return model


@pytest.fixture
def toy():
    register(Toy)
    yield Toy
    unregister("toy")
    assert "toy" not in STRATEGIES


def _recipe(tmp_path: Path, options: str = "{last_blocks: 1}") -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(
        f"""# compose train {path}
anchor: tiny:llama
strategy: toy
options: {options}
data: {{train: {TINY_DATA / "code.txt"}, seq_len: 32}}
train: {{max_steps: 2, batch_size: 2, progress: false, report_to: null, log_every: 1}}
eval: {{perplexity: {{general: {TINY_DATA / "general.txt"}}}, max_batches: 1, plots: false}}
output: {{dir: {tmp_path / "run"}}}
"""
    )
    return path


def test_toy_strategy_through_the_cli(toy, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "    toy: last_blocks (>= 1), explode" in capsys.readouterr().out  # its options, in the recipe keys
    recipe = _recipe(tmp_path)
    assert main(["check", str(recipe)]) == 0
    assert "main: " in capsys.readouterr().out
    assert main(["train", str(recipe)]) == 0
    final = tmp_path / "run" / "final"
    assert (final / "compose.json").is_file()
    assert main(["eval", str(final), "--data", f"general={TINY_DATA / 'general.txt'}", "--max-batches", "1"]) == 0
    assert "general: perplexity" in capsys.readouterr().out
    assert main(["export", str(final), str(tmp_path / "plain")]) == 0
    assert (tmp_path / "plain" / "config.json").is_file()


def test_toy_strategy_errors_are_reported(toy, tmp_path, capsys):
    assert main(["check", str(_recipe(tmp_path, "{last_blocks: 0}"))]) == 1
    assert "last_blocks=0 is not accepted; expected an integer >= 1" in capsys.readouterr().err
    assert main(["check", str(_recipe(tmp_path, "{last_blocks: 99}"))]) == 1
    assert "last_blocks=99 is more than the model's" in capsys.readouterr().err
    assert main(["check", str(_recipe(tmp_path, "{explode: true}"))]) == 1  # a build error is not swallowed
    assert "meta device failed: RuntimeError: toy build failed" in capsys.readouterr().err


# ---------------------------------------------------------------------------- validated once
def test_each_option_set_is_validated_once_per_recipe_run(toy, tmp_path, monkeypatch):
    import compose.recipe.schema
    import compose.rules
    import compose.validation

    calls: collections.Counter[str] = collections.Counter()
    real = compose.rules.validate_options

    def counting(cls, options, **kwargs):
        calls[cls.__name__] += 1
        return real(cls, options, **kwargs)

    for module in (compose.rules, compose.validation, compose.recipe.schema):
        monkeypatch.setattr(module, "validate_options", counting)
    assert main(["train", str(_recipe(tmp_path))]) == 0
    assert calls["TrainConfig"] == 1 and calls["ToyConfig"] == 1
    assert set(calls.values()) == {1}, calls
