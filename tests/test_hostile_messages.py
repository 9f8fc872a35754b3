"""Bad inputs that used to end in a raw Python or library error: each now names the file, record or option."""

from __future__ import annotations

import json

import pytest
import torch

from compose import Composer
from compose.cli import main as cli_main
from compose.recipe import RecipeError, check_recipe
from compose.testing import tiny_model, tiny_tokenizer
from compose.validation import OptionError

FIT = dict(max_steps=1, learning_rate=1e-2, batch_size=2, seq_len=8, progress=False, report_to=None)
BASE = {"anchor": "tiny:llama", "strategy": "block_expand", "options": {"num_blocks": 1}, "data": {"seq_len": 16}}


@pytest.fixture(scope="module")
def expand():
    return Composer(tiny_model("llama", seed=0), strategy="block_expand", num_blocks=1, tokenizer=tiny_tokenizer())


@pytest.fixture
def saved(expand, tmp_path):
    return expand.save(tmp_path / "out")


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.txt", "", r"empty.txt is empty: it holds no text"),
        ("blank.txt", "\n\n  \n", r"blank.txt is empty"),
        ("empty.jsonl", "", r"empty.jsonl is empty"),
        ("arrays.jsonl", "[1, 2, 3]\n[4, 5]\n", r"arrays.jsonl:1: a JSON list, not a record"),
        (
            "number.jsonl",
            '{"text": "ok"}\n{"text": 123}\n',
            r"number.jsonl:2: 'text' is 123 \(int\); expected a string",
        ),
    ],
)
@pytest.mark.parametrize("how", ["fit", "evaluate"])
def test_bad_data_files_are_named(expand, tmp_path, name, content, match, how):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        expand.fit(str(path), **FIT) if how == "fit" else expand.evaluate(str(path), seq_len=8)


@pytest.mark.parametrize("how", ["fit", "evaluate"])
def test_a_text_that_is_not_a_string_names_the_record(expand, how):
    data = [{"text": "fine"}, {"text": 123}]
    with pytest.raises(ValueError, match=r"_data\[1\]: 'text' is 123 \(int\); expected a string"):
        expand.fit(data, **FIT) if how == "fit" else expand.evaluate(data, seq_len=8)


def test_a_text_that_is_not_a_string_in_a_dataset_names_the_record(expand):
    import datasets

    ds = datasets.Dataset.from_dict({"text": [["not", "text"], ["x"]]})
    with pytest.raises(ValueError, match=r"record 0 holds \['not', 'text'\] \(list\) where text is expected"):
        expand.fit(ds, **FIT)


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.zeros((1, 0), dtype=torch.long), r"input_ids is empty \(shape \(1, 0\)\)"),
        (torch.tensor([[1.0, 2.0]]), r"input_ids must hold integer token ids \(torch.long\), got torch.float32"),
        (torch.tensor([[True, False]]), r"got torch.bool"),
    ],
)
def test_bad_prompt_tensors(expand, ids, match):
    with pytest.raises(OptionError, match=match):
        expand.generate(ids, max_new_tokens=2)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_evaluate_batch_size(expand, value):
    with pytest.raises(OptionError, match=rf"batch_size={value!r} is not accepted"):
        expand.evaluate(["some text"], batch_size=value)


def test_cli_eval_batch_size_zero(saved, tmp_path, capsys):
    (tmp_path / "d.txt").write_text("some text here\n")
    assert cli_main(["eval", str(saved), "--data", str(tmp_path / "d.txt"), "--batch-size", "0"]) == 1
    assert "batch_size=0 is not accepted" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: [m], r"compose.json holds a JSON list, not the object"),
        (lambda m: {k: v for k, v in m.items() if k != "strategy"}, r"'strategy' is missing"),
        (lambda m: {k: v for k, v in m.items() if k != "state"}, r"'state' is missing"),
        (lambda m: {**m, "state": {}}, r"has no state.inserted"),
        (lambda m: {**m, "options": "x"}, r"'options' is 'x'; expected a dict"),
    ],
)
def test_damaged_compose_json_is_named(saved, edit, match, capsys):
    meta = json.loads((saved / "compose.json").read_text())
    (saved / "compose.json").write_text(json.dumps(edit(meta)))
    with pytest.raises(ValueError, match=match):
        Composer.load(saved)
    assert cli_main(["generate", str(saved), "--prompt", "ab", "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err
    assert "compose.json" in err and "Traceback" not in err


def test_missing_config_json_is_named(saved):
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config.json: the saved model is incomplete"):
        Composer.load(saved)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool])
def test_non_float_dtype_is_refused(dtype):
    with pytest.raises(OptionError, match=rf"dtype={dtype} is not accepted; expected a floating-point dtype"):
        Composer(tiny_model("llama"), strategy="block_expand", num_blocks=1, dtype=dtype)


def test_a_model_on_the_meta_device_is_named_before_any_work(tmp_path):
    with torch.device("meta"):
        c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=1)  # as `compose check` builds it
    for action, call in [
        ("train", lambda: c.fit([{"input_ids": [1, 2, 3, 4] * 5}] * 4, **FIT)),
        ("generate", lambda: c.generate(torch.tensor([[1, 2]]), max_new_tokens=1)),
        ("save", lambda: c.save(tmp_path / "m")),
    ]:
        with pytest.raises(ValueError, match=rf"cannot {action}.*on the meta device"):
            call()
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("override", ["train.max_steps=[1,2", "train.max_steps={a: 1", "data.seq_len='16"])
def test_malformed_yaml_override_is_named(override):
    with pytest.raises(RecipeError, match=r"override .* is not valid YAML"):
        check_recipe(BASE, [override])


def test_eval_seq_len_1_is_refused_by_check(tmp_path):
    recipe = {**BASE, "output": {"dir": str(tmp_path / "run")}, "eval": {"seq_len": 1}}
    with pytest.raises(RecipeError, match=r"seq_len=1"):
        check_recipe(recipe)


def test_full_disk_names_the_file(expand, tmp_path, monkeypatch):
    import safetensors
    import transformers.modeling_utils

    first = expand.save(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 10)
        raise safetensors.SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    with pytest.raises(
        OSError,
        match=r"the disk is full \(No space left on device\): writing model.safetensors of .*out failed; nothing",
    ):
        expand.save(first)
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == before


def test_cli_eval_seq_len_beyond_positions(saved, tmp_path, capsys):
    (tmp_path / "d.txt").write_text("some text here\n")
    assert cli_main(["eval", str(saved), "--data", str(tmp_path / "d.txt"), "--seq-len", "4096"]) == 1
    assert "seq_len=4096 is beyond the model's 128 positions" in capsys.readouterr().err


def test_full_disk_names_the_file_the_error_names(expand, tmp_path, monkeypatch):
    import compose.io as cio

    first = expand.save(tmp_path / "out")

    def full(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(cio, "write_text", full)
    with pytest.raises(
        OSError, match=r"writing README.md of .*out failed; nothing was replaced"
    ):  # the card is written first
        expand.save(first)
