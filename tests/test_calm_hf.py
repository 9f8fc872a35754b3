"""CALM as a transformers model: HF generate over the composite cache, save_pretrained / from_pretrained."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from test_calm import PAIRS, _compose, _greedy_by_full_forward, _ids, _left_pad, _perturb
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

import compose  # noqa: F401 - registers compose_calm with the Auto classes
from compose import Composer
from compose.strategies.calm import CalmCache, CalmConfig, CalmForCausalLM
from compose.testing import tiny_model, tiny_tokenizer


def _prompt():
    return _left_pad([_ids(1, 7, seed=1)[0], _ids(1, 4, seed=2)[0]])


# ---------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize(
    "options",
    [
        dict(num_beams=3, do_sample=False),
        dict(do_sample=False, repetition_penalty=1.8, no_repeat_ngram_size=2),
        dict(do_sample=True, temperature=0.8, top_k=20),
    ],
    ids=["beams", "penalties", "sampling"],
)
def test_generate_at_init_equals_the_anchors_generate(pair, options):
    """At init the composition is the anchor, so every decoding mode must give the anchor's tokens."""
    c = _compose(pair)
    ids, mask = _prompt()
    kw = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=0, eos_token_id=None, **options)
    torch.manual_seed(4)
    ref = c.model.anchor.generate(ids, **kw)
    torch.manual_seed(4)
    ours = c.generate(ids, **kw)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("pair", list(PAIRS))
def test_beam_search_cached_equals_uncached_on_a_trained_composition(pair):
    """Beam search reorders every part of the cache (anchor, augments, projected keys/values) together."""
    c = _compose(pair)
    _perturb(c.model)
    ids, mask = _prompt()
    kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    cached = c.generate(ids, **kw)
    uncached = c.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    greedy = c.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(greedy, _greedy_by_full_forward(c.model, ids, mask, 6))


def test_min_new_tokens_stop_strings_streamer_and_scores():
    c = _compose("llama+gpt2")
    _perturb(c.model)
    tok = tiny_tokenizer()
    ids = _ids(1, 6, seed=3)
    free = c.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    new = free[0, ids.shape[1] :].tolist()
    # an eos that greedy emits early: stops there unless min_new_tokens holds it back
    eos = new[1]
    stopped = c.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert stopped.shape[1] < free.shape[1]
    held = c.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert held.shape[1] == ids.shape[1] + 12 and eos not in held[0, ids.shape[1] :].tolist()

    stop = tok.decode([new[3]])
    first = next(i for i, t in enumerate(new) if tok.decode([t]) == stop)
    cut = c.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, stop_strings=[stop], tokenizer=tok)
    assert torch.equal(cut, free[:, : ids.shape[1] + first + 1])

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    out = c.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, streamer=streamer)
    assert streamer.chunks[0] == ids[0].tolist() and streamer.chunks[-1] == "end"
    assert [t for chunk in streamer.chunks[1:-1] for t in chunk] == out[0, ids.shape[1] :].tolist()

    res = c.generate(
        ids, max_new_tokens=4, do_sample=False, eos_token_id=None, return_dict_in_generate=True, output_scores=True
    )
    assert len(res.scores) == 4 and isinstance(res.cache, CalmCache)
    assert res.cache.get_seq_length() == ids.shape[1] + 3  # the last token is never fed back
    with torch.no_grad():
        first_logits = c.model(ids).logits[:, -1]
    torch.testing.assert_close(res.scores[0], first_logits)
    with pytest.raises(ValueError, match="cache_implementation"):
        c.generate(ids, max_new_tokens=2, cache_implementation="static")


# ---------------------------------------------------------------------------------------------- save / load


def _saved_bases(tmp_path, pair="llama+gpt2"):
    (fa, ka), (fb, kb) = PAIRS[pair]
    anchor_dir, aug_dir = tmp_path / "anchor", tmp_path / "augment"
    tiny_model(fa, seed=0, **ka).save_pretrained(anchor_dir)
    tiny_model(fb, seed=1, **kb).save_pretrained(aug_dir)
    return anchor_dir, aug_dir


@pytest.mark.parametrize("pair", ["llama+gpt2", "gemma2+gpt_neox"])
def test_auto_model_from_pretrained_rebuilds_the_composition(tmp_path, pair):
    anchor_dir, aug_dir = _saved_bases(tmp_path, pair)
    c = Composer(str(anchor_dir), str(aug_dir), strategy="calm", every=2, num_heads=2)
    _perturb(c.model)
    ids = _ids(2, 9)
    with torch.no_grad():
        ref = c.model(ids).logits
    c.model.save_pretrained(tmp_path / "calm")
    files = sorted(p.name for p in (tmp_path / "calm").iterdir())
    assert files == ["calm.safetensors", "config.json", "generation_config.json"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "calm")
    assert isinstance(loaded, CalmForCausalLM) and isinstance(loaded.config, CalmConfig)
    assert loaded.plan == c.model.plan and loaded.connections[0].num_heads == 2
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    assert not any(p.requires_grad for p in loaded.anchor.parameters())

    out = c.save(tmp_path / "composer")  # Composer.save: the same layout plus compose.json
    assert AutoModelForCausalLM.from_pretrained(out).plan == c.model.plan
    for directory in (out, tmp_path / "calm"):
        again = Composer.load(directory)
        assert again.strategy.plan == c.strategy.plan
        with torch.no_grad():
            assert torch.equal(again.model(ids).logits, ref)


def test_clear_errors_at_load(tmp_path):
    anchor_dir, aug_dir = _saved_bases(tmp_path)
    c = Composer(str(anchor_dir), str(aug_dir), strategy="calm", every=2)
    saved = tmp_path / "calm"
    c.model.save_pretrained(saved)
    (fa, ka), (fb, kb) = PAIRS["llama+gpt2"]

    # a different augmenting model of the very same shapes
    with pytest.raises(ValueError, match="augmenting model 0 does not fit.*fingerprint"):
        CalmForCausalLM.from_pretrained(saved, augments=[tiny_model(fb, seed=7, **kb)])
    # the same weights under an edited head count
    edited = tmp_path / "edited"
    tiny_model(fb, seed=1, **kb).save_pretrained(edited)
    cfg = json.loads((edited / "config.json").read_text())
    cfg["n_head"] = 2
    (edited / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_attention_heads"):
        CalmForCausalLM.from_pretrained(saved, augments=[str(edited)])
    # the composition's own head count edited in its config
    config = json.loads((saved / "config.json").read_text())
    edited_calm = {**config, "options": {**config["options"], "num_heads": 3}}
    (saved / "config.json").write_text(json.dumps(edited_calm))
    with pytest.raises(ValueError, match="num_heads"):
        AutoModelForCausalLM.from_pretrained(saved)
    # a newer layout
    (saved / "config.json").write_text(json.dumps({**config, "calm_format_version": 99}))
    with pytest.raises(ValueError, match="newer|Upgrade compose"):
        AutoModelForCausalLM.from_pretrained(saved)
    # a base model that is gone
    (saved / "config.json").write_text(json.dumps(config))
    anchor_dir.rename(tmp_path / "moved")
    with pytest.raises(OSError, match="anchor model"):
        AutoModelForCausalLM.from_pretrained(saved)
    loaded = AutoModelForCausalLM.from_pretrained(saved, anchor=str(tmp_path / "moved"))
    assert isinstance(loaded, CalmForCausalLM)


# ---------------------------------------------------------------------------------------------- deprecations


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_no_deprecation_warnings_from_compose_calls(tmp_path):
    from transformers.utils import logging as hf_logging

    anchor_dir, aug_dir = _saved_bases(tmp_path)
    handler = _Records()
    hf_logger = hf_logging.get_logger("transformers")
    hf_logger.addHandler(handler)
    # transformers logs some deprecations once per process: forget what earlier tests triggered
    for fn in (getattr(hf_logger, "warning_once", None), getattr(hf_logger, "info_once", None)):
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c = Composer(str(anchor_dir), str(aug_dir), strategy="calm", every=2)
            ids, mask = _prompt()
            with torch.no_grad():
                c.model(ids, attention_mask=mask, labels=ids)
                c.model(ids, attention_mask=mask, use_cache=True)
            c.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
            c.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False)
            c.save(tmp_path / "out")
            Composer.load(tmp_path / "out")
            AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    finally:
        hf_logger.removeHandler(handler)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))] + [
        m for m in handler.messages if "deprecat" in m.lower()
    ]
    assert not deprecations, deprecations


# ---------------------------------------------------------------------------------------------- lm-evaluation-harness


def test_lm_eval_hflm_runs_on_the_composition():
    """``HFLM(pretrained=model)`` needs a real PreTrainedModel (config, tie_weights, device, generate ...)."""
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    c = _compose("llama+gpt2")
    tok = tiny_tokenizer()
    requests = [Instance("loglikelihood", {}, ("abc", "de"), 0), Instance("loglikelihood", {}, ("hello", " x"), 1)]
    until = [Instance("generate_until", {}, ("abc", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}), 0)]
    ours = huggingface.HFLM(pretrained=c.model, tokenizer=tok, batch_size=2, max_length=64)
    plain = huggingface.HFLM(pretrained=c.model.anchor, tokenizer=tok, batch_size=2, max_length=64)
    assert ours.loglikelihood(requests) == plain.loglikelihood(requests)  # identity at init
    assert ours.generate_until(until) == plain.generate_until(until)


def test_directory_saved_before_save_pretrained_still_loads(tmp_path):
    """The older layout (compose.json + calm.safetensors, no config.json) loads with the models given."""
    c = _compose("qwen3+llama", window=2)
    _perturb(c.model)
    ids = _ids(2, 8)
    with torch.no_grad():
        ref = c.model(ids).logits
    out = c.save(tmp_path / "old")
    for name in ("config.json", "generation_config.json"):
        (out / name).unlink()
    (fa, ka), (fb, kb) = PAIRS["qwen3+llama"]
    loaded = Composer.load(out, anchor=tiny_model(fa, seed=0, **ka), augment=tiny_model(fb, seed=1, **kb))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, ref)
    assert isinstance(loaded.model, CalmForCausalLM) and loaded.strategy.plan == c.strategy.plan
