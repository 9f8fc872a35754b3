"""evaluate() is the standard per-document measure: rolling windows, the tokenizer's own BOS,
bits per byte; it agrees with lm-evaluation-harness' loglikelihood_rolling."""

from __future__ import annotations

import math
import random

import pytest
import torch

from compose import Composer
from compose.scoring import prefix_tokens, rolling_windows
from compose.testing import tiny_model, tiny_tokenizer

DOCS = [
    "def f(x):\n\n    return x + 1\n\n\nprint(f(2))\n",
    "a short one",
    "the quick brown fox jumps over the lazy dog " * 3,
]


@pytest.mark.parametrize("max_length,context_len", [(16, 1), (16, 4), (7, 7), (5, 1)])
def test_windows_score_every_token_once_with_context(max_length, context_len):
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 60)
        first = rng.randint(1, max(1, min(n, 20)))
        seq = list(range(100, 100 + n))
        seen = []
        for start, end, k in rolling_windows(seq, first, max_length, context_len):
            assert 0 <= start < end <= len(seq) - 1 and end - start <= max_length and 1 <= k <= end - start
            targets = seq[end - k + 1 : end + 1]
            seen += targets
            if start > 0:  # a later window: its first scored token has at least context_len tokens before it
                assert end - k + 1 - start >= min(context_len, end - k + 1)
        assert seen == seq[first:]


def test_windows_match_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    rng = random.Random(1)
    for _ in range(100):
        tokens = [rng.randint(3, 90) for _ in range(rng.randint(1, 70))]
        want = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 1, 16, 1)]
        seq = [1] + tokens
        got = []
        for start, end, k in rolling_windows(seq, 1, 16, 1):
            got.append((seq[start:end], seq[end - k + 1 : end + 1]))
        # lm-eval gives (context, continuation) with the continuation's inputs appended to the context
        assert [(c + t[:-1])[-16:] for c, t in want] == [inp for inp, _ in got]
        assert [t for _, t in want] == [t for _, t in got]


def _reference(model, tokenizer, text, window):
    """Naive: the document alone, one forward per lm-eval window, summed log-probabilities."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    total = 0.0
    for context, target in map(make_disjoint_window, get_rolling_token_windows(ids, 1, window, 1)):
        inp = torch.tensor([(context + target)[:-1][-window:]])
        with torch.no_grad():
            lp = torch.log_softmax(model(inp).logits[0, -len(target) :].float(), -1)
        total += float(lp.gather(-1, torch.tensor(target)[:, None]).sum())
    return total, len(ids)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_evaluate_is_the_per_document_measure(family):
    tok = tiny_tokenizer()
    c = Composer(tiny_model(family, seed=2), strategy="block_expand", num_blocks=1, tokenizer=tok)
    got = c.evaluate(DOCS, seq_len=16, batch_size=3)
    ll, n = 0.0, 0
    for text in DOCS:
        s, k = _reference(c.model, tok, text, 16)
        ll, n = ll + s, n + k
    n_bytes = sum(len(t.encode()) for t in DOCS)
    assert got["tokens"] == n and got["documents"] == len(DOCS) and got["bytes"] == n_bytes
    assert got["loss"] == pytest.approx(-ll / n, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)


def test_a_document_scores_the_same_alone_or_with_others():
    tok = tiny_tokenizer()
    c = Composer(tiny_model("llama", seed=3), strategy="lora", r=2, tokenizer=tok)
    together = c.evaluate(DOCS, seq_len=16, batch_size=2)
    alone = [c.evaluate([d], seq_len=16, batch_size=1) for d in DOCS]
    total = sum(a["loss"] * a["tokens"] for a in alone)
    assert together["loss"] * together["tokens"] == pytest.approx(total, rel=1e-5)


def test_bos_is_the_first_tokens_context():
    """The tiny tokenizer adds <s> (id 1), as Llama's and Gemma's do: the first token is scored from it."""
    tok = tiny_tokenizer()
    assert prefix_tokens(tok) == [1]
    c = Composer(tiny_model("llama", seed=4), strategy="full", tokenizer=tok)
    with_bos = c.evaluate(["abc"], seq_len=16)
    other = c.evaluate(["abc"], seq_len=16, prefix_token_id=2)
    ids = torch.tensor([[1] + tok("abc", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(c.model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).sum()
    assert with_bos["tokens"] == 3 and with_bos["loss"] == pytest.approx(-float(lp) / 3, rel=1e-5)
    assert other["loss"] != pytest.approx(with_bos["loss"])


def test_prefix_falls_back_to_bos_then_eos():
    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = None  # adds nothing now, like SmolLM2's or Qwen's tokenizer
    assert tok("ab")["input_ids"] == tok("ab", add_special_tokens=False)["input_ids"]
    assert prefix_tokens(tok) == [tok.bos_token_id]
    tok.bos_token = None
    assert prefix_tokens(tok) == [tok.eos_token_id]


def test_pre_tokenized_and_prompt_completion_records():
    tok = tiny_tokenizer()
    c = Composer(tiny_model("llama", seed=5), strategy="full", tokenizer=tok)
    ids = list(range(3, 40))
    got = c.evaluate([{"input_ids": ids}], seq_len=16)
    assert got["tokens"] == len(ids) - 1 and "bits_per_byte" not in got  # no text, no bytes
    pc = c.evaluate([{"prompt": "Q: 1+1=", "completion": "2"}], seq_len=16)
    assert pc["tokens"] == 1 and pc["bytes"] == 1


def test_evaluate_agrees_with_lm_eval_word_and_byte_perplexity():
    """lm-eval's own HFLM.loglikelihood_rolling over the same documents, same window.

    ``add_bos_token=False``: with its default (None), lm-eval 0.4 encodes each document with the
    tokenizer's BOS *and* prepends its prefix token, so it scores the BOS itself as a document
    token (docs/guide.md, "Evaluation"); compose scores the document's own tokens only.
    """
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tok = tiny_tokenizer()
    c = Composer(tiny_model("llama", seed=6), strategy="block_expand", num_blocks=2, tokenizer=tok)
    lm = HFLM(pretrained=c.model, tokenizer=tok, max_length=16, batch_size=2, add_bos_token=False)
    requests = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(DOCS)]
    ll = sum(lm.loglikelihood_rolling(requests, disable_tqdm=True))
    words = sum(len(d.split()) for d in DOCS)  # lm-eval's wikitext counts re.split(r"\s+")
    got = c.evaluate(DOCS, seq_len=16)
    n_bytes = sum(len(d.encode()) for d in DOCS)
    assert got["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-2)
    assert got["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-4)
    assert got["words"] >= words


def test_evaluate_errors():
    c = Composer(tiny_model("llama", seed=7), strategy="full", tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="batch_size"):
        c.evaluate(DOCS, batch_size=0)
    with pytest.raises(ValueError, match="beyond the model's 128 positions"):
        c.evaluate(DOCS, seq_len=4096)
    with pytest.raises(ValueError, match=r"eval_data\[0\]: 'text' is 123"):
        c.evaluate([{"text": 123}], seq_len=16)


def test_a_directory_or_glob_of_files_is_one_document_per_file(tmp_path):
    """Code keeps its blank lines: each file is one document, in training and in evaluation."""
    from compose.data import load_records

    src = tmp_path / "lib"
    (src / "pkg").mkdir(parents=True)
    (src / "a.py").write_text(DOCS[0])
    (src / "pkg" / "b.py").write_text("x = 1\n\n\ny = 2\n")
    (src / "pkg" / "empty.py").write_text("\n\n")
    (src / ".hidden.py").write_text("skipped")
    records = load_records(str(src))
    assert sorted(records["text"]) == sorted([DOCS[0], "x = 1\n\n\ny = 2\n"])
    assert sorted(load_records(str(src / "**" / "b.py"))["text"]) == ["x = 1\n\n\ny = 2\n"]
    tok = tiny_tokenizer()
    c = Composer(tiny_model("llama", seed=8), strategy="full", tokenizer=tok)
    from_dir = c.evaluate(str(src), seq_len=16)
    assert from_dir["documents"] == 2
    assert from_dir["loss"] == pytest.approx(c.evaluate([DOCS[0], "x = 1\n\n\ny = 2\n"], seq_len=16)["loss"])
    with pytest.raises(FileNotFoundError, match="matches no files"):
        load_records(str(tmp_path / "nothing" / "*.py"))
    (src / "blob.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="blob.bin: not UTF-8"):
        load_records(str(src))


def test_calm_evaluate_is_the_per_document_measure():
    tok = tiny_tokenizer()
    anchor, aug = tiny_model("llama", seed=2, hidden=48, heads=6), tiny_model("gpt2", seed=3)
    c = Composer(anchor, aug, strategy="calm", every=2, tokenizer=tok)
    with torch.no_grad():  # move the connections off their identity init
        for p in c.model.connections.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    got = c.evaluate(DOCS, seq_len=16, batch_size=2)
    ll, n = 0.0, 0
    for text in DOCS:
        s, k = _reference(c.model, tok, text, 16)
        ll, n = ll + s, n + k
    assert got["tokens"] == n and got["loss"] == pytest.approx(-ll / n, rel=1e-5)
