"""CALM with an augmenting model that has its own tokenizer (cross-tokenizer composition).

Tokenizers are built offline: the tiny character-level one (``compose.testing``) and a
GPT-2-style byte-level BPE trained here on a small corpus. The composition's connections are
randomised where a test needs the augmenting model to matter (at init they add exactly 0).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

from compose import Composer
from compose.strategies.calm import CalmForCausalLM
from compose.strategies.calm.xtok import CrossTokenizer, check_round_trip
from compose.testing import tiny_model, tiny_tokenizer

WORDS = "the a def return if else for in while x y total value key print list hello world it's".split()


def _corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + f" = {rng.randint(0, 999)}." for _ in range(n)
    ]


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style), one special token used as BOS/EOS/pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)


@pytest.fixture(scope="module")
def chars() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def _randomize(c: Composer, seed: int = 0, std: float = 0.3) -> Composer:
    """Non-zero output projections, so the augmenting model changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conn in c.model.connections:
            conn.o.weight.copy_(torch.randn(conn.o.weight.shape, generator=g) * std)
    return c


def _compose(anchor_tok, aug_tok, anchor_family="llama", aug_family="gpt2", randomize=True, **options):
    anchor = tiny_model(anchor_family, hidden=48, heads=6, vocab=len(anchor_tok))
    aug = tiny_model(aug_family, seed=1, vocab=len(aug_tok))
    c = Composer(anchor, aug, strategy="calm", tokenizer=anchor_tok, augment_tokenizer=aug_tok, every=2, **options)
    return _randomize(c) if randomize else c


def _batch(tok, texts, side="right"):
    tok.padding_side = side
    try:
        return tok(texts, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = "right"


@pytest.fixture(scope="module", params=["bpe_anchor", "char_anchor"])
def pair(request, bpe, chars):
    """(anchor tokenizer, augmenting tokenizer): byte-level BPE anchor + characters, and the reverse."""
    return (bpe, chars) if request.param == "bpe_anchor" else (chars, bpe)


# ---------------------------------------------------------------------------------------------- basics


@pytest.mark.parametrize(
    "anchor_family,aug_family",
    [("llama", "gpt2"), ("qwen2", "gemma2"), ("gpt_neox", "llama"), ("gemma3_text", "llama"), ("llama", "gemma3_text")],
)
def test_identity_at_init(chars, bpe, anchor_family, aug_family):
    c = _compose(chars, bpe, anchor_family, aug_family, randomize=False)
    assert c.model.is_cross_tokenizer and isinstance(c.model.cross[0], CrossTokenizer)
    batch = _batch(chars, ["hello world = 12.", "x", "def f(y): return y"])
    with torch.no_grad():
        out = c.model(**batch).logits
        ref = c.model.anchor(**batch).logits
    real = batch["attention_mask"].bool()
    assert torch.equal(out[real], ref[real])
    # and the trained connections do change them
    _randomize(c)
    with torch.no_grad():
        assert not torch.allclose(c.model(**batch).logits[real], ref[real])


def test_no_leak(pair):
    """Changing the text after character c leaves anchor tokens ending at or before c unchanged."""
    anchor_tok, aug_tok = pair
    c = _compose(anchor_tok, aug_tok)
    xt = c.model.cross[0]
    rng = random.Random(3)
    checked = 0
    for trial in range(4):
        base = " ".join(rng.choice(WORDS) for _ in range(6))
        cut = rng.randint(3, len(base) - 2)
        other = base[:cut] + rng.choice(["zz", " qq", "'s", "1", " the end"]) + base[cut + 1 :]
        ids1 = anchor_tok(base)["input_ids"]
        ids2 = anchor_tok(other)["input_ids"]
        same = 0
        while same < min(len(ids1), len(ids2)) and ids1[same] == ids2[same]:
            same += 1
        ends = xt.anchor_ends(ids1, xt.text(ids1))
        upto = [t for t in range(same) if ends[t] <= cut]
        with torch.no_grad():
            l1 = c.model(torch.tensor([ids1])).logits[0]
            l2 = c.model(torch.tensor([ids2])).logits[0]
        for t in upto:
            assert torch.allclose(l1[t], l2[t], atol=1e-5), (trial, t, base, other)
        checked += len(upto)
        # the augmenting model is really read: some later token differs
        assert not torch.allclose(l1[same:].mean(), l2[same:].mean()) or same >= min(len(ids1), len(ids2))
    assert checked > 6


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding(pair, side):
    anchor_tok, aug_tok = pair
    c = _compose(anchor_tok, aug_tok)
    texts = ["hello world it's x = 12.", "def", "the total value"]
    batch = _batch(anchor_tok, texts, side)
    with torch.no_grad():
        logits = c.model(**batch).logits
        for b, text in enumerate(texts):
            alone = anchor_tok(text, return_tensors="pt")
            ref = c.model(**alone).logits[0]
            real = batch["attention_mask"][b].bool()
            assert torch.allclose(logits[b, real], ref, atol=1e-5)


def test_cached_generate_equals_full_forward(pair):
    anchor_tok, aug_tok = pair
    c = _compose(anchor_tok, aug_tok)
    prompts = _batch(anchor_tok, ["hello wor", "the total val"], "left")
    n = prompts["input_ids"].shape[1]
    with torch.no_grad():
        out = c.model.generate(
            **prompts,
            max_new_tokens=8,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=anchor_tok.pad_token_id,
        )
        mask = torch.cat([prompts["attention_mask"], torch.ones(2, out.sequences.shape[1] - n, dtype=torch.long)], 1)
        full = c.model(input_ids=out.sequences, attention_mask=mask).logits
    steps = torch.stack(out.logits, 1)
    assert torch.allclose(steps, full[:, n - 1 : -1], atol=1e-4)
    assert torch.equal(out.sequences, c.generate(**prompts, max_new_tokens=8, do_sample=False))


def test_beam_search_and_sampling_copies_rows(bpe, chars):
    c = _compose(chars, bpe)
    prompt = chars(["hello"], return_tensors="pt")
    with torch.no_grad():
        beams = c.model.generate(**prompt, max_new_tokens=6, num_beams=3, do_sample=False, num_return_sequences=2)
        assert beams.shape == (2, prompt["input_ids"].shape[1] + 6)
        torch.manual_seed(0)
        sampled = c.model.generate(**prompt, max_new_tokens=6, do_sample=True, num_return_sequences=2)
        assert sampled.shape[0] == 2
        # beam search's best sequence is scored with the same logits a full forward gives
        out = c.model.generate(
            **prompt, max_new_tokens=6, num_beams=2, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        full = torch.log_softmax(c.model(out.sequences).logits[0], -1)
        n = prompt["input_ids"].shape[1]
        expected = sum(full[n - 1 + i, out.sequences[0, n + i]] for i in range(6))
        assert torch.allclose(out.sequences_scores[0] * 6, expected, atol=1e-3)


def test_save_load_exact(tmp_path, pair):
    anchor_tok, aug_tok = pair
    c = _compose(anchor_tok, aug_tok)
    batch = _batch(anchor_tok, ["hello world = 3.", "it's"])
    with torch.no_grad():
        ref = c.model(**batch).logits
    c.save(tmp_path / "run")
    record = json.loads((tmp_path / "run" / "config.json").read_text())["cross_tokenizers"][0]
    assert record["path"] == "augment_tokenizer_0" and len(record["vocab"]) == 32
    assert (tmp_path / "run" / "augment_tokenizer_0" / "tokenizer.json").is_file()
    assert (tmp_path / "run" / "anchor_tokenizer" / "tokenizer.json").is_file()
    loaded = Composer.load(tmp_path / "run", anchor=c.model.anchor, augment=c.model.augments[0])
    assert loaded.model.is_cross_tokenizer
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, ref)
    direct = CalmForCausalLM.from_pretrained(tmp_path / "run", anchor=c.model.anchor, augments=[c.model.augments[0]])
    with torch.no_grad():
        assert torch.equal(direct(**batch).logits, ref)
    wrong = aug_tok is anchor_tok and None or (anchor_tok if aug_tok is not anchor_tok else None)
    with pytest.raises(ValueError, match="vocabulary fingerprint"):
        CalmForCausalLM.from_pretrained(
            tmp_path / "run", anchor=c.model.anchor, augments=[c.model.augments[0]], augment_tokenizers=[wrong]
        )


def test_same_vocabulary_path_unchanged(chars):
    """An augment_tokenizer with the anchor's vocabulary keeps the position-aligned path, bit for bit."""
    plain = Composer(tiny_model("llama", hidden=48, heads=6), tiny_model("gpt2", seed=1), strategy="calm", every=2)
    same = Composer(
        tiny_model("llama", hidden=48, heads=6),
        tiny_model("gpt2", seed=1),
        strategy="calm",
        every=2,
        tokenizer=chars,
        augment_tokenizer=tiny_tokenizer(),
    )
    assert not same.model.is_cross_tokenizer and same.model.config.cross_tokenizers is None
    _randomize(plain), _randomize(same)
    batch = _batch(chars, ["hello world", "x = 1"])
    with torch.no_grad():
        assert torch.equal(plain.model(**batch).logits, same.model(**batch).logits)


def test_augment_tokenizer_beside_the_model_is_the_default(tmp_path, chars, bpe):
    aug = tiny_model("gpt2", seed=1, vocab=len(bpe))
    aug.save_pretrained(tmp_path / "aug")
    bpe.save_pretrained(tmp_path / "aug")
    c = Composer(tiny_model("llama", hidden=48, heads=6), str(tmp_path / "aug"), strategy="calm", tokenizer=chars)
    assert c.model.is_cross_tokenizer
    assert c.model.augment_tokenizers[0].get_vocab() == bpe.get_vocab()


# ---------------------------------------------------------------------------------------------- errors


def test_errors(tmp_path, chars, bpe):
    anchor = tiny_model("llama", hidden=48, heads=6)
    aug = tiny_model("gpt2", seed=1, vocab=len(bpe))

    class Slow(PreTrainedTokenizer):
        def get_vocab(self):
            return {}

    with pytest.raises(ValueError, match=r"slow tokenizer.*use_fast=True"):
        Composer(anchor, aug, strategy="calm", tokenizer=chars, augment_tokenizer=Slow())
    with pytest.raises(ValueError, match="vocabulary mismatch.*augment_tokenizer"):
        Composer(anchor, aug, strategy="calm", tokenizer=chars)
    with pytest.raises(ValueError, match="pass the anchor's tokenizer"):
        Composer(anchor, aug, strategy="calm", augment_tokenizer=bpe)
    with pytest.raises(ValueError, match="beyond augmenting model 0's"):
        Composer(anchor, tiny_model("gpt2", seed=1), strategy="calm", tokenizer=chars, augment_tokenizer=bpe)
    with pytest.raises(ValueError, match="2 entries for 1"):
        Composer(anchor, aug, strategy="calm", tokenizer=chars, augment_tokenizer=[bpe, bpe])
    with pytest.raises(ValueError, match="takes no augment_tokenizer"):
        Composer(anchor, strategy="block_expand", num_blocks=2, augment_tokenizer=bpe)
    short = Composer(
        tiny_model("llama", hidden=48, heads=6, vocab=len(bpe)),
        tiny_model("gpt2", seed=1, vocab=len(chars), positions=16),
        strategy="calm",
        every=2,
        tokenizer=bpe,
        augment_tokenizer=chars,
    )
    ids = bpe("hello world it's the total value x = 12.", return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="beyond its 16 positions"):
        short.model(ids)

    # a lossy anchor tokenizer (lower-cases) cannot give the text back
    lower = Tokenizer(
        models.WordLevel({c: i for i, c in enumerate(["<unk>", *"abcdefghijklmnopqrstuvwxyz .,'"])}, "<unk>")
    )
    lower.normalizer = normalizers.Lowercase()
    lower.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    lower.decoder = decoders.Fuse()
    lossy = PreTrainedTokenizerFast(tokenizer_object=lower, unk_token="<unk>")
    with pytest.raises(ValueError, match="does not round-trip"):
        check_round_trip(lossy)
    with pytest.raises(ValueError, match="does not round-trip"):
        Composer(
            tiny_model("llama", hidden=48, heads=6, vocab=len(lossy)),
            aug,
            strategy="calm",
            tokenizer=lossy,
            augment_tokenizer=bpe,
        )

    # token ids cannot be re-tokenised: fit refuses them before training
    c = _compose(chars, bpe, randomize=False)
    records = [{"input_ids": chars("hello world")["input_ids"]}] * 4
    with pytest.raises(ValueError, match=r"train_data\[0\] gives input_ids records.*as text"):
        c.fit(records, max_steps=1, batch_size=2, seq_len=16)
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(ValueError, match="input_ids records"):
        c.fit(str(path), max_steps=1, batch_size=2, seq_len=16)
    with pytest.raises(ValueError, match="token ids"):
        c.fit(torch.randint(4, 90, (4, 16)), max_steps=1, batch_size=2, seq_len=16)


def test_fit_on_text_trains_the_connections(chars, bpe):
    c = _compose(chars, bpe, randomize=False)
    before = {n: p.detach().clone() for n, p in c.trainable_parameters().items()}
    c.fit(["hello world it's x = 12."] * 8, max_steps=2, batch_size=4, seq_len=24, learning_rate=1e-2)
    after = c.trainable_parameters()
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(p).all() for p in after.values())


def test_cached_generate_other_families(chars, bpe):
    """qwen2 anchor (biases) with a gemma2 augmenting model (tied embeddings, sliding window 8): the
    augmenting cache is cropped past its window, so rows are recomputed there; still exact."""
    c = _compose(chars, bpe, "qwen2", "gemma2")
    prompts = _batch(chars, ["hello world the total value", "def"], "left")
    n = prompts["input_ids"].shape[1]
    with torch.no_grad():
        out = c.model.generate(
            **prompts, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        mask = torch.cat([prompts["attention_mask"], torch.ones(2, out.sequences.shape[1] - n, dtype=torch.long)], 1)
        full = c.model(input_ids=out.sequences, attention_mask=mask).logits
    assert torch.allclose(torch.stack(out.logits, 1), full[:, n - 1 : -1], atol=1e-4)


@pytest.mark.parametrize(
    "anchor_family,aug_family",
    [("llama", "gpt2"), ("qwen2", "gemma2"), ("gemma3_text", "qwen2"), ("qwen2", "gemma3_text")],
)
def test_teacher_forced_cached_decoding_crops_the_augmenting_cache(chars, bpe, monkeypatch, anchor_family, aug_family):
    """Feeding a text one character at a time makes BPE merges re-tokenise the augmenting tail
    ("wor" + "l" + "d" -> "world"): the cache is cropped (for gemma2, past its sliding window of 8,
    the row is recomputed) and every step still equals the full forward."""
    from compose.strategies.calm import xtok

    crops = []
    original = xtok.RowState.crop

    def counting(self, keep):
        crops.append(len(self.augment_ids) - keep)
        original(self, keep)

    monkeypatch.setattr(xtok.RowState, "crop", counting)
    c = _compose(chars, bpe, anchor_family, aug_family)
    ids = chars("the total value = 12. hello world it's the key", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = c.model(ids).logits
        out = c.model(ids[:, :3], use_cache=True)
        steps = [out.logits]
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for t in range(3, ids.shape[1]):
            out = c.model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)
    assert sum(d > 0 for d in crops) >= 3  # merges did re-tokenise the tail


def test_check_text_data_forms():
    from datasets import Dataset

    from compose.strategies.calm.xtok import check_text_data

    for ok in (["some text"], [{"text": "a", "input_ids": [1, 2]}], [{"prompt": "a", "completion": "b"}], None):
        check_text_data(ok, "train_data")
    check_text_data(Dataset.from_dict({"text": ["a"]}), "train_data")
    with pytest.raises(ValueError, match="input_ids column and no text"):
        check_text_data(Dataset.from_dict({"input_ids": [[1, 2]]}), "train_data")
    with pytest.raises(ValueError, match=r"eval_data\[1\] gives input_ids records"):
        check_text_data([{"text": "a"}, {"input_ids": [1]}], "eval_data")
