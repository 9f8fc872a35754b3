"""Packing with exact document boundaries: a document's loss is the same packed with others or alone."""

from __future__ import annotations

import pytest
import torch

from compose import Composer, packing
from compose.data import IGNORE, build_blocks
from compose.testing import TINY_FAMILIES, randomize_, tiny_model

DOCS = [[5, 17, 30, 8, 44, 9, 2], [12, 60, 7, 33, 21, 50, 14, 40, 2], [70, 3, 88, 2]]
SEQ = 24  # all three documents fit in one block, padded


def _token_losses(model, batch) -> torch.Tensor:
    """Per-token next-token loss ``[B, T-1]`` (0 where the label is ignored)."""
    with torch.no_grad():
        logits = model(**packing.model_inputs(batch, model)).logits.float()
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return loss.view(labels.shape)


def _packed_vs_alone(model, document: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The losses of the middle document's tokens: inside the packed block, and as a block of its own."""
    packed = build_blocks([{"input_ids": d} for d in DOCS], None, SEQ, reset_position_ids=document)
    assert len(packed) == 1
    batch = packed.batch([0])
    start = len(DOCS[0])
    inside = _token_losses(model, batch)[0, start : start + len(DOCS[1]) - 1]
    alone = build_blocks([{"input_ids": DOCS[1]}], None, SEQ, reset_position_ids=document).batch([0])
    return inside, _token_losses(model, alone)[0, : len(DOCS[1]) - 1]


CASES = [(f, "sdpa") for f in ("llama", "gpt2", "qwen3", "gpt_neox", "mixtral")] + [("llama", "eager")]


@pytest.mark.parametrize("family,impl", [*CASES, ("gemma2", "eager")])  # gemma2: sliding window 8 of 24
def test_block_expand_document_loss_is_the_same_packed_or_alone(family, impl):
    kwargs = {"positions": 64} if family == "gpt2" else {}
    c = Composer(tiny_model(family, seed=0, **kwargs), strategy="block_expand", num_blocks=2)
    randomize_(c.model, seed=3)  # the new blocks away from identity, so every block matters
    c.model.set_attn_implementation(impl)
    inside, alone = _packed_vs_alone(c.model, document=True)
    torch.testing.assert_close(inside, alone, rtol=1e-5, atol=1e-5)
    leaky, alone_block = _packed_vs_alone(c.model, document=False)
    assert not torch.allclose(leaky, alone_block, atol=1e-3), "block packing should see the earlier document"


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_keeps_documents_apart(family):
    model = tiny_model(family, seed=0, **({"positions": 64} if family == "gpt2" else {}))
    if family not in ("gemma2",):
        model.set_attn_implementation("sdpa")
    inside, alone = _packed_vs_alone(model, document=True)
    torch.testing.assert_close(inside, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_calm_document_loss_is_the_same_packed_or_alone(impl):
    anchor, augment = tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)
    c = Composer(anchor, augment, strategy="calm", every=2)
    randomize_(c.model.connections, seed=5, std=0.3)  # trained-looking connections change the anchor's stream
    for m in (c.model.anchor, *c.model.augments):
        m.set_attn_implementation(impl)
    inside, alone = _packed_vs_alone(c.model, document=True)
    torch.testing.assert_close(inside, alone, rtol=1e-5, atol=1e-5)
    leaky, alone_block = _packed_vs_alone(c.model, document=False)
    assert not torch.allclose(leaky, alone_block, atol=1e-3)


def test_calm_cross_attention_alone_stays_inside_the_document():
    """The anchor's own attention is exact through transformers; the cross-attention through compose."""
    anchor, augment = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    c = Composer(anchor, augment, strategy="calm", every=2)
    batch = build_blocks([{"input_ids": d} for d in DOCS], None, SEQ, reset_position_ids=True).batch([0])
    docs = packing.document_ids(batch["position_ids"])
    ones = torch.ones_like(batch["attention_mask"])  # what forward uses when called without a mask
    ctx = c.model._context(batch["input_ids"], ones, batch["position_ids"], None, 0, docs)
    visible = ctx.visible[0][0]
    for q in range(SEQ):
        for k in range(SEQ):
            assert bool(visible[q, k]) == (k <= q and bool(docs[0, q] == docs[0, k]))


def test_positions_restart_at_documents_and_blocks():
    long_doc = list(range(10, 40))  # 30 tokens: continues into the next block of 16
    blocks = build_blocks([{"input_ids": [5, 6, 2]}, {"input_ids": long_doc}], None, 16, reset_position_ids=True)
    pos = blocks.batch(range(len(blocks)))["position_ids"]
    assert pos[0].tolist() == [0, 1, 2, *range(13)]
    assert pos[1].tolist() == list(range(16))
    assert pos[2, :2].tolist() == [0, 1]  # the long document's last tokens start over in the third block


def test_varlen_kwargs_split_rows_and_documents():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 5, 0, 1, 2]])
    kw = packing.varlen_kwargs(pos)
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 9, 12]
    assert kw["max_length_q"] == 3
    assert packing.document_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 1, 1, 1]]


def test_model_inputs_drop_the_mask_only_with_positions():
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert set(packing.model_inputs(batch)) == {"input_ids", "attention_mask"}
    batch["position_ids"] = torch.arange(4)[None]
    assert set(packing.model_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}


def _reference_flash(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash attention's contract in plain torch: no mask; documents only from ``cu_seq_lens_q`` (else whole rows)."""
    b, h, t, d = query.shape
    key = key.repeat_interleave(h // key.shape[1], dim=1)
    value = value.repeat_interleave(h // value.shape[1], dim=1)
    cu = kwargs.get("cu_seq_lens_q")
    bounds = cu.tolist() if cu is not None else list(range(0, b * t + 1, t))
    flat = [x.transpose(1, 2).reshape(b * t, h, d) for x in (query, key, value)]
    out = torch.empty(b * t, h, d, dtype=query.dtype)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[lo:hi].transpose(0, 1) for x in flat)
        out[lo:hi] = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).transpose(
            0, 1
        )
    return out.view(b, t, h, d), None


def test_flash_style_attention_gets_documents_as_varlen_arguments():
    """A flash kernel sees no mask: the documents reach it as cu_seq_lens (batch of 2 rows, 3 documents each)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register("varlen_reference", _reference_flash)
    AttentionMaskInterface.register("varlen_reference", flash_attention_mask)
    model = tiny_model("llama", seed=0)
    model.set_attn_implementation("varlen_reference")
    assert packing.uses_varlen(model)
    blocks = build_blocks([{"input_ids": d} for d in DOCS * 2], None, SEQ, reset_position_ids=True)
    losses, n = _token_losses(model, blocks.batch([0, 1])), len(DOCS[1]) - 1
    alone = build_blocks([{"input_ids": DOCS[1]}], None, SEQ, reset_position_ids=True).batch([0])
    expected = _token_losses(model, alone)[0, :n]
    # the middle document is at 7 in the first row (after DOCS[0]) and at 3 in the second (after DOCS[0]'s end)
    torch.testing.assert_close(losses[0, 7 : 7 + n], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[1, 3 : 3 + n], expected, rtol=1e-5, atol=1e-5)


def test_cross_tokenizer_calm_document_loss_is_the_same_packed_or_alone():
    """Each packed document is re-tokenized alone for the augmenting model; no text crosses documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compose.testing import tiny_tokenizer

    texts = ["hello world = 12.", "def f(y): return y + 1", "x = 3."]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    eos = "<|endoftext|>"
    aug_tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, bos_token=eos, pad_token=eos)
    chars = tiny_tokenizer()
    anchor, augment = tiny_model("llama", seed=0), tiny_model("gpt2", seed=1, vocab=len(aug_tok))
    c = Composer(anchor, augment, strategy="calm", tokenizer=chars, augment_tokenizer=aug_tok, every=2)
    randomize_(c.model.connections, seed=5, std=0.3)
    packed = build_blocks(texts, chars, 64, reset_position_ids=True)
    assert len(packed) == 1
    lengths = [len(chars(t)["input_ids"]) + 1 for t in texts]  # + EOS
    losses = _token_losses(c.model, packed.batch([0]))[0]
    alone = build_blocks([texts[1]], chars, 64, reset_position_ids=True).batch([0])
    n = lengths[1] - 1
    expected = _token_losses(c.model, alone)[0, :n]
    torch.testing.assert_close(losses[lengths[0] : lengths[0] + n], expected, rtol=1e-5, atol=1e-5)
    leaky = build_blocks(texts, chars, 64).batch([0])
    blocky = _token_losses(c.model, leaky)[0, lengths[0] : lengths[0] + n]
    assert not torch.allclose(blocky, expected, atol=1e-3)


@pytest.mark.parametrize("strategy", ["block_expand", "calm"])
def test_fit_trains_on_documents_apart(strategy):
    """fit's first logged loss (before any update) is the mean over the documents each scored alone."""
    anchor = tiny_model("llama", seed=0)
    if strategy == "calm":
        c = Composer(anchor, tiny_model("qwen2", seed=1), strategy="calm", every=2)
        randomize_(c.model.connections, seed=5, std=0.3)  # trained-looking cross-attention
    else:
        c = Composer(anchor, strategy="block_expand", num_blocks=2)
        randomize_(c.model, seed=3)
    total, count = 0.0, 0
    for d in DOCS:
        alone = build_blocks([{"input_ids": d}], None, SEQ, reset_position_ids=True).batch([0])
        losses = _token_losses(c.model, alone)
        total, count = total + float(losses.sum()), count + len(d) - 1
    records = [{"input_ids": d} for d in DOCS]
    c.fit(records, max_steps=1, batch_size=1, seq_len=SEQ, learning_rate=1e-9, log_every=1, progress=False,
          report_to=None, packing_attention="document", mixed_precision="no")  # fmt: skip
    assert c.history[0]["loss"] == pytest.approx(total / count, rel=1e-5)
