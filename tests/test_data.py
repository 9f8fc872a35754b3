"""Data sources -> packed blocks (DESIGN.md: datasets, strings, dicts, files, hub names)."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from compose.data import IGNORE, build_blocks, load_records
from compose.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_strings_are_tokenized_packed_and_eos_separated(tok):
    blocks = build_blocks(["abc", "de"], tok, seq_len=4)
    # <s> a b c </s> <s> d e </s>  -> 9 tokens -> blocks of 4, 4, 1 (last padded)
    flat = blocks.input_ids[blocks.attention_mask.bool()].tolist()
    assert flat == tok("abc")["input_ids"] + [2] + tok("de")["input_ids"] + [2]
    assert blocks.input_ids.shape == (3, 4)
    assert blocks.attention_mask[-1].tolist() == [1, 0, 0, 0]
    assert blocks.labels[-1].tolist() == [2, IGNORE, IGNORE, IGNORE]


def test_input_ids_records_need_no_tokenizer():
    blocks = build_blocks([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE, 9]}], None, seq_len=5)
    assert blocks.input_ids[0].tolist() == [5, 6, 7, 8, 9]
    assert blocks.labels[0].tolist() == [5, 6, 7, IGNORE, 9]


def test_prompt_tokens_are_masked(tok):
    blocks = build_blocks([{"prompt": "Q:", "completion": "A"}], tok, seq_len=8, packing=False)
    n_prompt = len(tok("Q:")["input_ids"])
    labels = blocks.labels[0].tolist()
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt : n_prompt + 2] == [tok.convert_tokens_to_ids("A"), 2]
    unmasked = build_blocks([{"prompt": "Q:", "completion": "A"}], tok, seq_len=8, packing=False, mask_prompt=False)
    assert unmasked.labels[0, 0].item() != IGNORE


def test_no_packing_pads_and_truncates(tok):
    blocks = build_blocks(["abcdefgh", "a"], tok, seq_len=4, packing=False)
    assert blocks.input_ids.shape == (2, 4)
    assert blocks.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "parquet", "dataset", "datasetdict"])
def test_file_and_dataset_sources(tmp_path, tok, kind):
    docs = ["first doc", "second doc"]
    if kind == "txt":
        src = tmp_path / "d.txt"
        src.write_text("\n\n".join(docs))
    elif kind == "jsonl":
        src = tmp_path / "d.jsonl"
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    elif kind == "json":
        src = tmp_path / "d.json"
        src.write_text(json.dumps([{"text": d} for d in docs]))
    elif kind == "parquet":
        src = tmp_path / "d.parquet"
        datasets.Dataset.from_dict({"text": docs}).to_parquet(str(src))
    elif kind == "dataset":
        src = datasets.Dataset.from_dict({"text": docs})
    else:
        src = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})})
    records = load_records(str(src) if kind in ("txt", "jsonl", "json", "parquet") else src)
    assert [r["text"] for r in records] == docs
    assert build_blocks(src, tok, seq_len=8).num_tokens == sum(len(tok(d)["input_ids"]) + 1 for d in docs)


def test_bad_sources(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records("data/missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_records(str(bad))
    with pytest.raises(ValueError, match="expected 'text', 'input_ids', 'prompt' \\+ 'completion', or 'messages'"):
        build_blocks([{"content": "x"}], tok, seq_len=4)
    with pytest.raises(ValueError, match="no tokens to learn from"):
        build_blocks([{"input_ids": [1, 2], "labels": [IGNORE, IGNORE]}], None, seq_len=4)
    with pytest.raises(TypeError, match="only strings or only dicts"):
        load_records(["a", {"text": "b"}])
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        load_records(str(tmp_path / "d.csv"))


def test_hub_name_goes_to_datasets_and_fails_clearly_offline():
    # HF_DATASETS_OFFLINE=1 in the tests: the hub path is taken, and its failure is explained
    with pytest.raises(ValueError, match="could not load 'someorg/some-dataset' as a local file or a hub dataset"):
        load_records("someorg/some-dataset")


def test_blocks_are_long_tensors(tok):
    blocks = build_blocks(["abc"], tok, seq_len=4)
    assert all(t.dtype == torch.long for t in blocks[0].values())


def test_position_ids_restart_at_each_packed_document(tok):
    blocks = build_blocks(["abc", "de"], tok, seq_len=16, reset_position_ids=True)
    first = len(tok("abc")["input_ids"]) + 1  # + EOS
    second = len(tok("de")["input_ids"]) + 1
    assert blocks[0]["position_ids"][: first + second].tolist() == list(range(first)) + list(range(second))


def test_packing_groups_are_arrow_backed_and_cached(tmp_path, tok, monkeypatch):
    import compose.data

    src = tmp_path / "d.txt"
    src.write_text("\n\n".join(f"document {i} " + "xyz " * (i % 7) for i in range(50)))
    cache = tmp_path / "cache"
    first = build_blocks(str(src), tok, seq_len=32, cache_dir=str(cache))
    assert first.dataset.cache_files and all(str(cache) in f["filename"] for f in first.dataset.cache_files)

    def boom(*args, **kwargs):
        raise AssertionError("tokenized again instead of reusing the cache")

    monkeypatch.setattr(compose.data._Tokenize, "_encode", boom)
    second = build_blocks(str(src), tok, seq_len=32, cache_dir=str(cache))
    assert torch.equal(second.input_ids, first.input_ids)


def test_worker_processes_give_the_same_blocks(tok):
    docs = [f"doc {i} " + "ab" * (i % 9) for i in range(40)]
    one = build_blocks(docs, tok, seq_len=16)
    two = build_blocks(docs, tok, seq_len=16, num_proc=2)
    assert torch.equal(one.input_ids, two.input_ids) and torch.equal(one.labels, two.labels)


def test_one_map_and_worker_maps_cut_the_same_groups(tok):
    """Without num_proc tokenize + pack run as one map, with it as two; the blocks are the same,
    across several packing groups and a last, partial group."""
    from compose.data import PACK_GROUP

    docs = [f"d{i} " + "xy" * (i % 5) for i in range(2 * PACK_GROUP + 37)]
    one = build_blocks(docs, tok, seq_len=16, reset_position_ids=True)
    two = build_blocks(docs, tok, seq_len=16, reset_position_ids=True, num_proc=2)
    assert len(one) == len(two) and one.num_tokens == two.num_tokens
    assert one.num_targets() == two.num_targets()
    for key in ("input_ids", "labels", "attention_mask", "position_ids"):
        assert torch.equal(one.batch(range(len(one)))[key], two.batch(range(len(two)))[key]), key


def test_non_utf8_file_is_named(tmp_path, tok):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n\nsecond".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text"):
        build_blocks(str(bad), tok, seq_len=8)


def test_recipe_sources_can_be_streamed(tmp_path):
    from omegaconf import OmegaConf

    from compose.data import build_data

    (tmp_path / "a.txt").write_text("\n\n".join(f"alpha {i}" for i in range(20)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": f"beta {i}"}) + "\n" for i in range(20)))
    cfg = OmegaConf.create({"data": {"text_field": "text", "seq_len": 8, "packing": True, "mask_prompt": True}})
    sources = [str(tmp_path / "a.txt"), {"path": str(tmp_path / "b.jsonl"), "columns": {"body": "text"}, "weight": 3}]
    stream = build_data(sources, None, cfg, streaming=True, seed=0)
    assert isinstance(stream, datasets.IterableDataset)
    texts = [r["text"] for r in stream.take(16)]
    assert any(t.startswith("alpha") for t in texts) and any(t.startswith("beta") for t in texts)
