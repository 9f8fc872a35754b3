"""Checkpoints people can publish: sharded safetensors, model cards, push to the Hub (stubbed, no network)."""

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from compose import Composer
from compose.cli import main
from compose.export import export_plain
from compose.io import MARKER
from compose.recipe import check_recipe, run_recipe
from compose.testing import tiny_model, tiny_tokenizer
from compose.validation import OptionError

TINY_DATA = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "data"
IDS = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))


def _named(model, name):
    model.config._name_or_path = name  # what a model loaded from the Hub records
    return model


def _composer(strategy, **options):
    if strategy == "calm":
        anchor = _named(tiny_model("llama", hidden=48, heads=6), "org/anchor-7b")
        return Composer(anchor, _named(tiny_model("gpt2", seed=1), "org/augment-1b"), strategy="calm", every=2)
    return Composer(
        _named(tiny_model("llama"), "org/tiny-llama"), strategy=strategy, tokenizer=tiny_tokenizer(), **options
    )


def _shards(directory):
    return sorted(p.name for p in Path(directory).glob("model-*-of-*.safetensors"))


@pytest.mark.parametrize("strategy,options", [("block_expand", {"num_blocks": 2}), ("full", {})])
def test_sharded_save_reloads_with_identical_logits(tmp_path, strategy, options):
    c = _composer(strategy, **options)
    with torch.no_grad():
        c.model.model.layers[2].mlp.down_proj.weight.normal_()  # trained-looking weights, not the identity
    c.save(tmp_path / "out", max_shard_size="20KB")
    shards = _shards(tmp_path / "out")
    assert len(shards) > 1 and not (tmp_path / "out" / "model.safetensors").exists()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    with torch.no_grad():
        want = c.model(IDS).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(IDS).logits, want)
        assert torch.equal(Composer.load(tmp_path / "out").model(IDS).logits, want)


def test_export_shards_and_carries_the_run_results_into_the_card(tmp_path):
    c = _composer("lora", r=4)
    c.save(tmp_path / "adapter")
    (tmp_path / "adapter" / "results.json").write_text(
        json.dumps({"eval": {"perplexity": {"code": {"perplexity": 3.5, "loss": 1.25}}}})
    )
    out = export_plain(c, tmp_path / "merged", source_dir=tmp_path / "adapter", max_shard_size=30_000)
    assert len(_shards(out)) > 1
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out)
        assert torch.allclose(merged(IDS).logits, c.model(IDS).logits, atol=1e-5)
    adapter_card, card = ModelCard.load(tmp_path / "adapter" / "README.md"), ModelCard.load(out / "README.md")
    assert adapter_card.data.library_name == "peft" and adapter_card.data.base_model_relation == "adapter"
    assert card.data.library_name == "transformers" and card.data.base_model == "org/tiny-llama"
    assert "| code | perplexity | 3.5000 |" in card.text


@pytest.mark.parametrize("bad", ["huge", "-5GB", 0, 1.5, True])
def test_bad_shard_size_is_an_error_naming_the_option(tmp_path, bad):
    c = _composer("full")
    with pytest.raises(OptionError, match="max_shard_size"):
        c.save(tmp_path / "out", max_shard_size=bad)
    assert not (tmp_path / "out").exists()


def test_block_expansion_card_parses_as_hub_metadata(tmp_path):
    c = _composer("block_expand", num_blocks=2)
    c.data_names = ["HuggingFaceFW/fineweb-edu", "code.jsonl"]
    c.save(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-llama" and data["library_name"] == "transformers"
    assert {"compose", "block-expand", "llama-pro"} <= set(data["tags"])
    assert data["datasets"] == ["HuggingFaceFW/fineweb-edu"]  # a local file is named in the text only
    assert "https://arxiv.org/abs/2401.02415" in card.text and "`code.jsonl`" in card.text
    assert "AutoModelForCausalLM.from_pretrained" in card.text
    assert json.loads((tmp_path / "out" / "compose.json").read_text())["data"] == c.data_names


def test_calm_card_names_both_bases_and_needs_import_compose(tmp_path):
    c = _composer("calm")
    c.save(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == ["org/anchor-7b", "org/augment-1b"]
    assert card.data.library_name == "compose" and "calm" in card.data.tags
    assert "import compose" in card.text and "https://arxiv.org/abs/2401.02412" in card.text
    assert "augmenting model 0: `org/augment-1b`" in card.text


def test_local_base_models_stay_out_of_the_metadata(tmp_path):
    anchor = tiny_model("llama")
    anchor.save_pretrained(tmp_path / "base")
    c = Composer(str(tmp_path / "base"), strategy="block_expand", num_blocks=1, tokenizer=tiny_tokenizer())
    c.save(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model is None and str(tmp_path / "base") in card.text


def test_a_readme_of_your_own_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine\n")
    _composer("full").save(out, overwrite=True)
    assert (out / "README.md").read_text() == "mine\n" and (out / "config.json").is_file()


def test_recipe_run_card_has_the_recipe_and_the_evaluation_table(tmp_path):
    code, general = str(TINY_DATA / "code.txt"), str(TINY_DATA / "general.txt")
    recipe = {
        "anchor": "tiny:llama?hidden=32&layers=2",
        "strategy": "block_expand",
        "options": {"num_blocks": 1},
        "data": {"train": code, "seq_len": 32},
        "train": {"max_steps": 1, "batch_size": 2, "progress": False, "report_to": None},
        "eval": {"perplexity": {"general": general}, "baseline": True, "max_batches": 1, "plots": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    run_recipe(check_recipe(recipe), log=lambda *a: None)
    card = ModelCard.load(tmp_path / "run" / "final" / "README.md")
    assert "## Evaluation" in card.text and "| general | perplexity |" in card.text
    assert "before training" in card.text  # the baseline column
    assert "## Recipe" in card.text and "strategy: block_expand" in card.text
    assert "`code.txt`" in card.text


class _StubHub:
    """Stands in for the Hub API: records the calls, copies the uploaded files into a local folder."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def install(self, monkeypatch):
        stub = self

        def create_repo(api, repo_id, **kwargs):
            stub.calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
            from huggingface_hub.utils import filter_repo_objects

            stub.calls.append(("upload_folder", repo_id, kwargs))
            files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
            for name in filter_repo_objects(files, ignore_patterns=ignore_patterns):
                (stub.root / repo_id / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(folder_path) / name, stub.root / repo_id / name)
            return huggingface_hub.CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/1", commit_message="", commit_description="",
                oid="1" * 40,
            )  # fmt: skip

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        return self


def test_push_to_hub_uploads_shards_and_a_card_naming_the_repo(tmp_path, monkeypatch):
    hub = _StubHub(tmp_path / "hub").install(monkeypatch)
    c = _composer("block_expand", num_blocks=2)
    url = c.push_to_hub("me/tiny-pro", private=True, max_shard_size="20KB")
    assert url == "https://huggingface.co/me/tiny-pro/commit/1"
    assert [call[0] for call in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][2]["private"] is True
    pushed = tmp_path / "hub" / "me" / "tiny-pro"
    assert len(_shards(pushed)) > 1 and (pushed / "model.safetensors.index.json").is_file()
    assert not (pushed / MARKER).exists()
    card = ModelCard.load(pushed / "README.md")
    assert 'from_pretrained("me/tiny-pro")' in card.text and card.data.base_model == "org/tiny-llama"
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(pushed)(IDS).logits, c.model(IDS).logits)


def test_compose_push_uploads_a_saved_directory(tmp_path, monkeypatch, capsys):
    hub = _StubHub(tmp_path / "hub").install(monkeypatch)
    _composer("calm").save(tmp_path / "calm")
    assert main(["push", str(tmp_path / "calm"), "me/calm", "--commit-message", "first"]) == 0
    assert hub.calls[1][2]["commit_message"] == "first"
    pushed = tmp_path / "hub" / "me" / "calm"
    assert {"config.json", "calm.safetensors", "README.md", "compose.json"} <= {p.name for p in pushed.iterdir()}
    assert "pushed" in capsys.readouterr().out


def test_push_refuses_what_it_cannot_upload(tmp_path, monkeypatch, capsys):
    _StubHub(tmp_path / "hub").install(monkeypatch)
    (tmp_path / "empty").mkdir()
    assert main(["push", str(tmp_path / "empty"), "me/x"]) == 1
    assert "holds no model" in capsys.readouterr().err
    _composer("full").save(tmp_path / "out")
    assert main(["push", str(tmp_path / "out"), "not a repo id"]) == 1
    assert "not a Hub repository id" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(tmp_path / "out"), "me/x"]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_compose_export_max_shard_size(tmp_path, capsys):
    c = _composer("full")
    c.save(tmp_path / "saved")
    assert main(["export", str(tmp_path / "saved"), str(tmp_path / "bad"), "--max-shard-size", "huge"]) == 1
    assert "max_shard_size='huge' is not accepted" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["export", str(tmp_path / "saved"), str(tmp_path / "out"), "--max-shard-size", "30000"]) == 0
    assert len(_shards(tmp_path / "out")) > 1 and (tmp_path / "out" / "README.md").is_file()
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(IDS).logits, c.model(IDS).logits)
