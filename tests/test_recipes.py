"""Recipes: every shipped recipe validates and runs (on tiny stand-ins); bad recipes fail clearly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from compose.recipe import RecipeError, check_recipe, load_recipe, run_recipe, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
TINY_DATA = ROOT / "recipes" / "tiny" / "data"


def _ids(p: Path) -> str:
    return str(p.relative_to(ROOT / "recipes"))


def test_recipes_are_shipped():
    names = {_ids(p) for p in RECIPES}
    assert {"llama_pro/code.yaml", "llama_pro/math.yaml", "calm/code.yaml", "calm/low_resource.yaml"} <= names
    assert {"tiny/block_expand.yaml", "tiny/calm.yaml", "tiny/chat.yaml", "llama_pro/instruct.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=_ids)
def test_shipped_recipe_checks(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their local files relative to the repository root
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "compose" in first and _ids(path) in first, "recipes open with their command"
    recipe = check_recipe(path)
    assert recipe.stages


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = f"""
anchor: tiny:llama
strategy: block_expand
options: {{num_blocks: 1}}
data: {{train: {TINY_DATA / "code.txt"}, seq_len: 32}}
train: {{max_steps: 2}}
"""


@pytest.mark.parametrize(
    "extra,key",
    [
        ("trian: {max_steps: 2}\n", "trian"),
        ("eval: {perplexity: {}, batchsize: 2}\n", "eval.batchsize"),
        ("data2: 1\n", "data2"),
    ],
)
def test_misspelt_key_is_named(tmp_path, extra, key):
    with pytest.raises(RecipeError, match=rf"unknown key '{key}'.*valid keys"):
        check_recipe(_write(tmp_path, BASE + extra))


def test_misspelt_train_key_suggests_and_moved_keys_point_to_their_section(tmp_path):
    with pytest.raises(RecipeError, match=r"train.lerning_rate.*did you mean 'learning_rate'.*max_steps"):
        check_recipe(_write(tmp_path, BASE), ["train.lerning_rate=1e-3"])
    with pytest.raises(RecipeError, match=r"data.seq_len"):
        check_recipe(_write(tmp_path, BASE), ["train.seq_len=16"])


def test_misspelt_stage_key_is_named(tmp_path):
    text = BASE + "stages:\n  - name: a\n  - name: b\n    strategy: full\n    trian: {max_steps: 1}\n"
    with pytest.raises(RecipeError, match=r"stages\[1\].*'trian'.*valid keys"):
        check_recipe(_write(tmp_path, text))


def test_unknown_strategy_lists_known_ones(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown strategy 'blockexpand'.*block_expand.*calm.*full.*lora"):
        check_recipe(_write(tmp_path, BASE), ["strategy=blockexpand"])


def test_unknown_option_and_bad_values(tmp_path):
    with pytest.raises(RecipeError, match="num_block"):
        check_recipe(_write(tmp_path, BASE), ["options.num_block=2"])
    with pytest.raises(RecipeError, match="max_steps"):
        check_recipe(_write(tmp_path, BASE), ["train.max_steps=0"])
    with pytest.raises(RecipeError, match="max_steps"):
        check_recipe(_write(tmp_path, BASE), ["train.max_steps=many"])
    with pytest.raises(RecipeError, match="does not exist"):
        check_recipe(_write(tmp_path, BASE), ["data.train=missing/file.txt"])
    with pytest.raises(RecipeError, match="tiny family"):
        check_recipe(_write(tmp_path, BASE), ["anchor=tiny:nope"])
    with pytest.raises(RecipeError, match="augmenting model"):
        check_recipe(_write(tmp_path, BASE), ["strategy=calm", "options={}"])
    with pytest.raises(RecipeError, match="key=value"):
        check_recipe(_write(tmp_path, BASE), ["train.max_steps"])


def test_overrides_and_stages(tmp_path):
    text = BASE + (
        "output: {dir: " + str(tmp_path / "run") + "}\n"
        "stages:\n  - name: expand\n  - name: sft\n    strategy: full\n    train: {learning_rate: 1.0e-5, max_steps: 5}\n"
    )
    r = load_recipe(_write(tmp_path, text), ["train.max_steps=3", "stages.1.train.learning_rate=2e-5"])
    expand, sft = r.stages
    assert expand.config.train.max_steps == 3 and sft.config.train.max_steps == 3  # overrides win in stages too
    assert sft.config.train.learning_rate == 2e-5
    assert dict(expand.config.options) == {"num_blocks": 1} and dict(sft.config.options) == {}
    assert sft.chained and sft.config.anchor == str(tmp_path / "run" / "expand" / "final")
    assert expand.output_dir == tmp_path / "run" / "expand"


def test_tiny_tokenizer_round_trips():
    tok = tiny_tokenizer()
    ids = tok("def f(x):\n    return x")["input_ids"]
    assert ids[0] == tok.bos_token_id and max(ids) < 96
    assert tok.decode(ids, skip_special_tokens=True) == "def f(x):\n    return x"


def _tiny_version(path: Path, out: Path) -> dict:
    """The recipe with models, data and sizes swapped for tiny local stand-ins (2 steps per stage)."""
    raw = OmegaConf.to_container(OmegaConf.create(path.read_text()), resolve=False)
    raw = copy.deepcopy(raw)
    code, general = str(TINY_DATA / "code.txt"), str(TINY_DATA / "general.txt")

    def shrink(section: dict, top: bool) -> None:
        if "anchor" in section or top:
            section["anchor"] = "tiny:llama?hidden=32&layers=4"
        if section.get("augment") is not None and "${" not in str(section["augment"]):
            section["augment"] = "tiny:qwen2?hidden=32&layers=4&seed=1"
        if "dtype" in section or top:
            section["dtype"] = None
        if "data" in section or top:
            data = section.setdefault("data", {})
            data.update(train=code, eval=None, tokenizer=None, seq_len=32)
        if "train" in section or top:
            section.setdefault("train", {}).update(
                max_steps=2,
                batch_size=2,
                gradient_accumulation_steps=1,
                mixed_precision="no",
                eval_every=0,
                save_every=0,
                progress=False,
                report_to=None,
            )
        if "eval" in section or top:
            ev = section.setdefault("eval", {})
            ev.update(perplexity={"general": general, "code": code}, domain=["code"], max_batches=1, plots=False)
            if ev.get("exact_match"):
                ev["exact_match"] = {"arithmetic": str(TINY_DATA / "arithmetic.jsonl")}
                ev["max_new_tokens"] = 2

    shrink(raw, top=True)
    for stage in raw.get("stages") or []:
        shrink(stage, top=False)
    raw["output"] = {"dir": str(out)}
    return raw


@pytest.mark.parametrize("path", RECIPES, ids=_ids)
def test_every_recipe_runs_on_tiny_stand_ins(path, tmp_path):
    recipe = check_recipe(_tiny_version(path, tmp_path / "run"))
    results = run_recipe(recipe, log=lambda *a: None)
    assert len(results) == len(recipe.stages)
    for stage, (name, res) in zip(recipe.stages, results.items()):
        assert name == (stage.name or "main")
        final = Path(res["output"])
        assert (final / "compose.json").is_file() and (final / "recipe.yaml").is_file()
        assert yaml.safe_load((final / "recipe.yaml").read_text())["strategy"] == recipe.config.strategy
        assert set(res["eval"]["perplexity"]) == {"general", "code"}
        assert [h["step"] for h in res["history"]][-1] == 2


def test_override_replaces_a_mapping_and_creates_missing_sections(tmp_path):
    text = BASE + f"eval: {{perplexity: {{code: {TINY_DATA / 'code.txt'}, general: {TINY_DATA / 'general.txt'}}}}}\n"
    r = load_recipe(_write(tmp_path, text), [f"eval.perplexity={{only: {TINY_DATA / 'code.txt'}}}", "output.dir=x/y"])
    assert list(r.stages[0].config.eval.perplexity) == ["only"]  # replaced, not merged
    assert r.stages[0].output_dir == Path("x/y")


def test_check_counts_trainable_parameters_per_stage(monkeypatch):
    from compose.testing import tiny_model

    monkeypatch.chdir(ROOT)
    recipe = check_recipe(ROOT / "recipes" / "tiny" / "block_expand.yaml")
    model = tiny_model("llama", hidden=48, layers=4)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert recipe.counts["expand"] == 2 * block
    assert recipe.counts["sft"] == sum(p.numel() for p in model.parameters()) + 2 * block


def test_augment_tokenizer_is_passed_to_the_composer(tmp_path):
    from compose.recipe.runner import _build_composer

    tok_dir = tmp_path / "aug_tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    calm = ["strategy=calm", "augment=tiny:llama?layers=2&seed=1", "options={every: 1}"]
    stage = check_recipe(_write(tmp_path, BASE), calm + [f"data.augment_tokenizer={tok_dir}"]).stages[0]
    assert _build_composer(stage).strategy_name == "calm"
    two = check_recipe(_write(tmp_path, BASE), calm + [f"data.augment_tokenizer=[{tok_dir},{tok_dir}]"]).stages[0]
    with pytest.raises(ValueError, match="augment_tokenizer has 2 entries for 1"):
        _build_composer(two)
    expand = check_recipe(_write(tmp_path, BASE), [f"data.augment_tokenizer={tok_dir}"]).stages[0]
    with pytest.raises(ValueError, match="takes no augment_tokenizer"):
        _build_composer(expand)
