"""Long documents in bounded pieces: the same tokens as the whole document, and memory that does not follow it."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import compose.longdoc as longdoc
from compose.data import build_blocks, stream_blocks
from compose.longdoc import encode_bounded, split_text
from compose.testing import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _document(chars: int, seed: int = 0, newlines: bool = True) -> str:
    rng = random.Random(seed)
    lines = []
    while sum(map(len, lines)) < chars:
        words = ("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 9)))
        lines.append(" ".join(words))
    return ("\n" if newlines else " ").join(lines)


@pytest.fixture
def small_limits(monkeypatch):
    """Limits of a few dozen characters, so that small documents are cut many times."""
    monkeypatch.setattr(longdoc, "LONG_CHARS", 200)
    monkeypatch.setattr(longdoc, "PIECE_CHARS", 64)
    monkeypatch.setattr(longdoc, "CALL_CHARS", 100)


def _bpe():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([_document(20_000, seed=9)], vocab_size=300, min_frequency=2, special_tokens=["</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")


@pytest.mark.parametrize("newlines", [True, False])
@pytest.mark.parametrize("size", [1, 7, 64])
def test_split_text_gives_the_text_back_in_bounded_pieces(newlines, size):
    text = _document(900, newlines=newlines)
    pieces = split_text(text, size)
    assert "".join(pieces) == text and all(len(p) <= size for p in pieces)
    if newlines and size == 64:  # cut after a newline wherever the piece holds one
        assert all(p.endswith("\n") for p in pieces[:-1])


@pytest.mark.parametrize("make", [tiny_tokenizer, _bpe], ids=["characters", "byte-level-bpe"])
def test_bounded_encoding_equals_the_whole_document(make):
    tok = make()
    texts = [_document(n, seed=n) for n in (10, 350, 1200, 90)]
    whole = tok(texts)["input_ids"]
    assert encode_bounded(tok, texts, True, limit=100) == whole
    flags = [(True, False), (False, False), (False, True), (True, True)]  # pieces of documents: BOS on first only
    first = tok(texts[0])["input_ids"]
    assert encode_bounded(tok, texts, flags, limit=100)[0] == first  # the tiny tokenizer's BOS: prefix only


def _tokens(blocks) -> list[int]:
    return [t for row in blocks.dataset.with_format(None)["input_ids"] for t in row]


def test_long_documents_pack_into_the_same_tokens(small_limits, tmp_path):
    tok = tiny_tokenizer()
    docs = [_document(50), _document(1000, 1), _document(30, 2), _document(700, 3, newlines=False)]
    expected = [t for d in docs for t in tok(d)["input_ids"] + [tok.eos_token_id]]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for source in (docs, str(tmp_path / "d.jsonl")):
        blocks = build_blocks(source, tok, 16, cache_dir=str(tmp_path / "cache"))
        assert _tokens(blocks) == expected
        stream = stream_blocks(source, tok, 16)._make(0)
        assert [t for row in stream for t in row["input_ids"]] == expected


def test_a_txt_with_a_long_paragraph_is_read_in_pieces_like_datasets_reads_it(small_limits, tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    text = "\n\n".join([_document(50), _document(1000, 1), "", _document(30, 2), _document(700, 3)]) + "\n\n\n"
    (tmp_path / "d.txt").write_text(text)
    pieced = build_blocks(str(tmp_path / "d.txt"), tok, 16, cache_dir=str(tmp_path / "a"))
    assert len(pieced.dataset.cache_files) and longdoc._has_long_paragraph(tmp_path / "d.txt")
    streamed = [t for row in stream_blocks(str(tmp_path / "d.txt"), tok, 16)._make(0) for t in row["input_ids"]]
    monkeypatch.setattr(longdoc, "LONG_CHARS", 10**9)  # datasets' own reader, whole paragraphs
    whole = build_blocks(str(tmp_path / "d.txt"), tok, 16, cache_dir=str(tmp_path / "b"))
    assert _tokens(pieced) == _tokens(whole) == streamed


def test_a_txt_without_long_paragraphs_is_read_as_before(tmp_path):
    (tmp_path / "d.txt").write_text("one\n\ntwo\n")
    assert longdoc.txt_records(str(tmp_path / "d.txt"), "text", None) is None


@pytest.mark.slow
def test_fit_memory_does_not_follow_one_documents_size(tmp_path):
    """bench/long_document.py: a 100 MB single-document .txt within 1.3x of a 10 MB one and under 1.5 GiB;
    the same for a .jsonl of one 50 MB record against a 5 MB one."""
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "bench" / "long_document.py"), "--json", str(out), "--dir", str(tmp_path)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    results = json.loads(out.read_text())["results"]
    for suffix in (".txt", ".jsonl"):
        rows = results[suffix]
        assert rows["ratio"] <= 1.3, rows
        assert all(r["peak_rss_mb"] < 1.5 * 1024 for k, r in rows.items() if k != "ratio"), rows
