"""CALM: the invariants of DESIGN.md on tiny random anchor / augmenting pairs of different shapes."""

from __future__ import annotations

import pytest
import torch

from compose import Composer
from compose.strategies.calm import WEIGHTS_NAME, CalmForCausalLM, StopForward
from compose.strategies.calm.modeling import _Context
from compose.testing import tiny_model

# (anchor family, anchor kwargs), (augment family, augment kwargs): different hidden sizes and head counts.
PAIRS = {
    "llama+gpt2": (("llama", dict(hidden=48, heads=6, kv_heads=2)), ("gpt2", dict(hidden=32, heads=4))),
    "qwen3+llama": (("qwen3", dict(hidden=64, heads=4, kv_heads=2, layers=3)), ("llama", dict(hidden=32, heads=4))),
    "gemma2+gpt_neox": (("gemma2", dict(hidden=32, heads=4, kv_heads=2)), ("gpt_neox", dict(hidden=48, heads=6))),
    # Gemma 3 both ways: as anchor over a tied-head Llama, and as augment of an untied-head Qwen2.
    "gemma3_text+llama": (("gemma3_text", dict(hidden=32, heads=4)), ("llama", dict(hidden=48, heads=6, tie=True))),
    "qwen2+gemma3_text": (("qwen2", dict(hidden=48, heads=6, kv_heads=2)), ("gemma3_text", dict(hidden=32, heads=4))),
}


def _compose(pair: str, **options) -> Composer:
    (fa, ka), (fb, kb) = PAIRS[pair]
    options.setdefault("every", 2)
    return Composer(tiny_model(fa, seed=0, **ka), tiny_model(fb, seed=1, **kb), strategy="calm", **options)


@torch.no_grad()
def _perturb(model: CalmForCausalLM, seed: int = 0, std: float = 0.3) -> None:
    """Move every composition parameter, output projections included, away from its init."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.connections.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r) :] = r
        mask[i, n - len(r) :] = 1
    return ids, mask


def _greedy_by_full_forward(model, ids, mask, steps):
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids, attention_mask=mask).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


# ---------------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("pair", list(PAIRS))
def test_identity_at_init_and_only_connections_train(pair):
    c = _compose(pair)
    anchor = c.model.anchor
    ids = _ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding: valid positions keep their position ids, so the anchor is the reference
    with torch.no_grad():
        assert torch.equal(c.model(ids).logits, anchor(ids).logits)
        ref = anchor(ids, attention_mask=mask).logits
        out = c.model(ids, attention_mask=mask).logits
    assert torch.equal(out[mask.bool()], ref[mask.bool()])
    trainable = c.trainable_parameters()
    assert trainable and all(n.startswith("connections.") for n in trainable)
    assert not any(p.requires_grad for p in anchor.parameters())
    assert not any(p.requires_grad for a in c.model.augments for p in a.parameters())
    assert {n for n, p in c.model.named_parameters() if n.startswith("connections.")} == set(trainable)


@pytest.mark.parametrize("pair", list(PAIRS))
def test_no_future_leak(pair):
    c = _compose(pair)
    _perturb(c.model)
    ids = _ids(2, 12)
    t = 6
    changed = ids.clone()
    changed[:, t + 1 :] = _ids(2, 12, seed=5)[:, t + 1 :]
    with torch.no_grad():
        a = c.model(ids).logits
        b = c.model(changed).logits
        plain = c.model.anchor(ids).logits
    assert not torch.allclose(a, plain, atol=1e-3), "perturbed connections must change the logits"
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("pair", list(PAIRS))
def test_left_padded_batch_equals_unpadded_rows(pair):
    c = _compose(pair)
    _perturb(c.model)
    rows = [_ids(1, 11, seed=1)[0], _ids(1, 6, seed=2)[0], _ids(1, 8, seed=3)[0]]
    ids, mask = _left_pad(rows)
    garbage = ids.clone()
    garbage[mask == 0] = 77  # what sits under the padding must not matter
    with torch.no_grad():
        batched = c.model(ids, attention_mask=mask).logits
        batched_garbage = c.model(garbage, attention_mask=mask).logits
        for i, r in enumerate(rows):
            single = c.model(r[None]).logits[0]
            torch.testing.assert_close(batched[i, -len(r) :], single, atol=1e-4, rtol=1e-4)
    valid = mask.bool()
    torch.testing.assert_close(batched[valid], batched_garbage[valid], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched).all()


@pytest.mark.parametrize("pair", list(PAIRS))
def test_cached_generation_equals_full_forward_greedy(pair):
    c = _compose(pair)
    _perturb(c.model)
    ids, mask = _left_pad([_ids(1, 7, seed=1)[0], _ids(1, 4, seed=2)[0]])
    out = c.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert out.shape == (2, ids.shape[1] + 8)
    assert torch.equal(out, _greedy_by_full_forward(c.model, ids, mask, 8))
    uncached = c.model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(out, uncached)


def test_generation_matches_transformers_generate_at_init():
    """At init the composition is the anchor, so our decoding loop must reproduce transformers' own generate."""
    c = _compose("llama+gpt2")
    ids, mask = _left_pad([_ids(1, 7, seed=1)[0], _ids(1, 4, seed=2)[0], _ids(1, 5, seed=3)[0]])
    kw = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=0)
    anchor = c.model.anchor
    # pick an eos that greedy actually emits, so that stopping and pad-filling are exercised
    probe = anchor.generate(ids, do_sample=False, eos_token_id=None, **kw)
    eos = int(probe[0, ids.shape[1] + 2])
    for extra in (dict(do_sample=False, eos_token_id=eos), dict(do_sample=True, temperature=0.7, top_k=20)):
        torch.manual_seed(3)
        ref = anchor.generate(ids, **kw, **extra)
        torch.manual_seed(3)
        ours = c.generate(ids, **kw, **extra)
        assert torch.equal(ours, ref), extra


def test_sampling_is_reproducible_with_a_seed():
    c = _compose("qwen3+llama")
    _perturb(c.model)
    ids = _ids(2, 5)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.3, top_k=30, top_p=0.95)
    torch.manual_seed(0)
    a = c.generate(ids, **kw)
    torch.manual_seed(0)
    b = c.generate(ids, **kw)
    torch.manual_seed(1)
    d = c.generate(ids, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, d)


def test_fit_leaves_frozen_models_bit_identical(tmp_path, random_ids):
    c = _compose("llama+gpt2")
    frozen = {n: p.detach().clone() for n, p in c.model.named_parameters() if not n.startswith("connections.")}
    trained = {n: p.detach().clone() for n, p in c.trainable_parameters().items()}
    c.fit(
        random_ids(8, 16),
        max_steps=3,
        learning_rate=1e-2,
        batch_size=2,
        seq_len=16,
        output_dir=str(tmp_path / "run"),
        gradient_checkpointing=True,
        report_to=None,
    )
    for n, p in c.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(not torch.equal(p, trained[n]) for n, p in c.trainable_parameters().items() if n.endswith("o.weight"))
    assert not c.model.anchor.training and not any(m.training for m in c.model.anchor.modules())


def test_train_mode_keeps_frozen_models_in_eval_and_checkpointing_gives_same_grads():
    c = _compose("llama+gpt2")
    _perturb(c.model)
    ids = _ids(2, 10)

    def grads():
        c.model.zero_grad(set_to_none=True)
        c.model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in c.trainable_parameters().items()}

    c.model.train()
    assert c.model.connections.training
    assert not any(m.training for m in [*c.model.anchor.modules(), *c.model.augments.modules()])
    plain = grads()
    c.model.gradient_checkpointing_enable()
    c.model.train()
    # only the checkpointed blocks themselves are in training mode (transformers checkpoints only then)
    assert not any(m.training for m in c.model.anchor.modules() if not getattr(m, "gradient_checkpointing", False))
    checkpointed = grads()
    c.model.gradient_checkpointing_disable()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_augmenting_model_stops_at_highest_used_layer():
    c = _compose("llama+gpt2", connections=[(1, 1), (0, 3)])
    calls = []
    blocks = c.model.augments[0].transformer.h
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        c.model(_ids(1, 5))
    for h in handles:
        h.remove()
    assert calls == [0, 1]
    # called on its own, the augmenting model is untouched by the capture hooks
    with torch.no_grad():
        c.model.augments[0](_ids(1, 5))


def test_hook_handles_tuple_and_tensor_block_outputs():
    c = _compose("llama+gpt2")
    _perturb(c.model)
    model = c.model
    hidden = torch.randn(1, 4, 48)
    states = torch.randn(1, 4, 32)
    k, v = model.connections[0].keys_values(states)
    layer = model.plan[0][2]
    ks, vs = [k] * len(model.plan), [v] * len(model.plan)
    visible = torch.ones(4, 4, dtype=torch.bool).tril()[None]
    model._ctx = _Context(ks, vs, [visible])
    try:
        as_tensor = model._anchor_hook(layer, None, None, hidden)
        as_tuple = model._anchor_hook(layer, None, None, (hidden, "extra"))
    finally:
        model._ctx = None
    assert isinstance(as_tuple, tuple) and as_tuple[1] == "extra"
    assert torch.equal(as_tuple[0], as_tensor)
    assert not torch.equal(as_tensor, hidden)
    with pytest.raises(StopForward):
        model._captured = [{}]
        try:
            model._augment_hook(0, 3, True, None, None, (states,))
        finally:
            model._captured = None


# ---------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_is_exact_and_small(tmp_path):
    c = _compose("gemma2+gpt_neox")
    _perturb(c.model)
    ids = _ids(2, 9)
    with torch.no_grad():
        ref = c.model(ids).logits
    out = c.save(tmp_path / "calm")
    anchor_bytes = sum(p.numel() * p.element_size() for p in c.model.anchor.parameters())
    weights = out / WEIGHTS_NAME
    n_bytes = sum(p.numel() * p.element_size() for p in c.trainable_parameters().values())
    assert weights.stat().st_size < n_bytes + 4096
    assert sum(f.stat().st_size for f in out.iterdir()) < anchor_bytes
    (fa, ka), (fb, kb) = PAIRS["gemma2+gpt_neox"]
    loaded = Composer.load(out, anchor=tiny_model(fa, seed=0, **ka), augment=tiny_model(fb, seed=1, **kb))
    assert loaded.strategy.plan == c.strategy.plan
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, ref)
    assert set(loaded.trainable_parameters()) == set(c.trainable_parameters())

    with pytest.raises(ValueError, match="does not fit"):
        Composer.load(out, anchor=tiny_model(fa, seed=0, **{**ka, "hidden": 64}), augment=tiny_model(fb, seed=1, **kb))
    with pytest.raises(ValueError, match="augmenting model"):
        Composer.load(out, anchor=tiny_model(fa, seed=0, **ka), augment=[tiny_model(fb, **kb), tiny_model(fb, **kb)])


# ---------------------------------------------------------------------------------------------- options


def test_several_augmenting_models_and_explicit_connections():
    anchor = tiny_model("mistral", hidden=48, heads=6, kv_heads=2)
    augs = [tiny_model("mixtral", seed=1, hidden=32, heads=4), tiny_model("gpt2", seed=2, hidden=40, heads=4)]
    c = Composer(anchor, augs, strategy="calm", connections=[[(1, 0), (-1, 3)], [(2, 2)]])
    assert c.strategy.plan == [(0, 1, 0), (0, 3, 3), (1, 2, 2)]
    assert [conn.proj.in_features for conn in c.model.connections] == [32, 32, 40]
    ids = _ids(2, 10)
    with torch.no_grad():
        assert torch.equal(c.model(ids).logits, anchor(ids).logits)
    _perturb(c.model)
    with torch.no_grad():
        base = c.model(ids).logits
        c.model.connections[2].o.weight.zero_()  # drop the second augment's only connection
        without_second = c.model(ids).logits
    assert not torch.allclose(base, without_second)

    default = Composer(anchor, augs, strategy="calm", every=2)
    assert default.strategy.plan == [(0, 1, 1), (0, 3, 3), (1, 1, 1), (1, 3, 3)]


def test_options_gate_norm_and_heads_keep_identity():
    c = _compose("llama+gpt2", gate=True, norm=True, num_heads=3)
    ids = _ids(2, 8)
    assert c.model.connections[0].num_heads == 3
    with torch.no_grad():
        assert torch.equal(c.model(ids).logits, c.model.anchor(ids).logits)
    with pytest.raises(ValueError, match="divisible"):
        _compose("llama+gpt2", num_heads=5)


# ---------------------------------------------------------------------------------------------- errors


def test_clear_errors():
    llama, gpt2 = tiny_model("llama", hidden=48, heads=6), tiny_model("gpt2", seed=1)
    with pytest.raises(ValueError, match="out of range"):
        Composer(llama, gpt2, strategy="calm", connections=[(4, 0)])
    with pytest.raises(ValueError, match="out of range"):
        Composer(llama, gpt2, strategy="calm", connections=[(0, -5)])
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        Composer(llama, tiny_model("gpt2", vocab=128), strategy="calm")
    with pytest.raises(ValueError, match="augmenting model"):
        Composer(llama, strategy="calm")
    with pytest.raises(ValueError, match="augmenting model"):
        Composer(llama, gpt2, strategy="calm", connections=[[(0, 0)], [(1, 1)]])
    with pytest.raises(ValueError, match="selects none"):
        Composer(llama, gpt2, strategy="calm", every=8)
    with pytest.raises(ValueError, match="connections must be"):
        Composer(llama, gpt2, strategy="calm", connections=[(0, 1, 2)])
    with pytest.raises(ValueError, match="every"):
        Composer(llama, gpt2, strategy="calm", every=0)
    with pytest.raises(ValueError, match="unknown option"):
        Composer(llama, gpt2, strategy="calm", evry=2)
    from compose.strategies.calm import Calm, CalmOptions

    with pytest.raises(ValueError, match="augmenting model"):
        Calm(CalmOptions()).build(llama, [])


# ---------------------------------------------------------------------------------------------- "input" target


@pytest.mark.parametrize("pair", ["llama+gpt2", "gemma2+gpt_neox"])  # gemma2 scales its embeddings
def test_input_connection_invariants(pair):
    """A connection into the anchor's input (block 0's hidden_states): identity at init, causal, cached = full."""
    c = _compose(pair, connections=[(1, "input"), (-1, 1)])
    assert c.strategy.plan[0][2] == "input"
    model = c.model
    ids = _ids(2, 12)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model.anchor(ids).logits)
    _perturb(model)
    with torch.no_grad():
        model.connections[1].o.weight.zero_()  # only the input connection acts
        a = model(ids).logits
        assert not torch.allclose(a, model.anchor(ids).logits, atol=1e-3)
        changed = ids.clone()
        changed[:, 7:] = _ids(2, 12, seed=5)[:, 7:]
        b = model(changed).logits
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    _perturb(model)
    prompt, mask = _left_pad([_ids(1, 7, seed=1)[0], _ids(1, 4, seed=2)[0]])
    out = c.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(out, _greedy_by_full_forward(model, prompt, mask, 6))


def test_input_connection_acts_before_block_zero_and_round_trips(tmp_path):
    c = _compose("llama+gpt2", connections=[(0, "embed")], norm=True)
    assert c.strategy.plan == [(0, 0, "input")]
    model = c.model
    _perturb(model)
    seen = []
    block0 = model.anchor.model.layers[0]
    handle = block0.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    ids = _ids(2, 9)
    with torch.no_grad():
        ref = model(ids).logits
        emb = model.anchor.get_input_embeddings()(ids)
    handle.remove()
    hidden = seen[0][0][0] if seen[0][0] else seen[0][1]["hidden_states"]
    assert not torch.allclose(hidden, emb)  # block 0 received the embeddings plus the connection
    # the pre-hook accepts hidden_states passed positionally or by keyword
    k, v = model.connections[0].keys_values(torch.randn(1, 4, 32))
    visible = torch.ones(4, 4, dtype=torch.bool).tril()[None]
    x = torch.randn(1, 4, 48)
    model._ctx = _Context([k], [v], [visible])
    try:
        (pos,), _ = model._anchor_input_hook(block0, (x,), {})
        _, kw = model._anchor_input_hook(block0, (), {"hidden_states": x, "other": 1})
    finally:
        model._ctx = None
    assert torch.equal(pos, kw["hidden_states"]) and kw["other"] == 1 and not torch.equal(pos, x)

    out = c.save(tmp_path / "calm")
    (fa, ka), (fb, kb) = PAIRS["llama+gpt2"]
    loaded = Composer.load(out, anchor=tiny_model(fa, seed=0, **ka), augment=tiny_model(fb, seed=1, **kb))
    assert loaded.strategy.plan == [(0, 0, "input")]
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, ref)
    with pytest.raises(ValueError, match="connections must be"):
        _compose("llama+gpt2", connections=[(0, "output")])


# ---------------------------------------------------------------------------------------------- window, null_kv, out_scale


def test_windowed_visibility_is_causal_local_and_masks_padding():
    from compose.strategies.calm import causal_visibility, windowed_visibility

    q, k = torch.arange(2, 6), torch.arange(6)
    key_mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    assert windowed_visibility(None) is causal_visibility
    vis = windowed_visibility(2)(q, k, key_mask)[0]
    for i, t in enumerate(q.tolist()):
        assert vis[i].nonzero().flatten().tolist() == [s for s in (t - 1, t) if s >= 1]
    assert windowed_visibility(1)(q, k, key_mask)[0].sum(-1).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("pair", ["llama+gpt2", "gemma2+gpt_neox"])
@pytest.mark.parametrize("window", [1, 3])
def test_window_and_null_kv_keep_the_invariants(pair, window):
    """Identity at init, locality (a change of the augmenting input only reaches ``window`` positions),
    padding, and cached generation == full forward, with a window and a null key/value."""
    c = _compose(pair, connections=[(1, "input"), (-1, 1)], window=window, null_kv=True)
    model = c.model
    ids = _ids(2, 12)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model.anchor(ids).logits)
    names = set(c.trainable_parameters())
    assert {"connections.0.null_k", "connections.0.null_v"} <= names
    _perturb(model)
    # Locality, at the connection itself: changing the augmenting state at position t changes the
    # connection's output at t .. t + window - 1 only (the models' own attention spreads it further).
    conn = model.connections[0]
    t, n = 5, 12
    hidden = torch.randn(2, n, conn.q.in_features)
    states = torch.randn(2, n, conn.proj.in_features)
    moved = states.clone()
    moved[:, t] += 1.0
    visible = model.visibility[0](torch.arange(n), torch.arange(n), torch.ones(2, n, dtype=torch.long))
    with torch.no_grad():
        a = conn(hidden, *conn.keys_values(states), visible)
        b = conn(hidden, *conn.keys_values(moved), visible)
    changed = ((a - b).abs().amax(dim=(0, 2)) > 0).nonzero().flatten().tolist()
    assert changed == list(range(t, min(n, t + window)))
    _perturb(model, seed=1)
    rows = [_ids(1, 9, seed=1)[0], _ids(1, 5, seed=2)[0]]
    prompt, mask = _left_pad(rows)
    with torch.no_grad():
        batched = model(prompt, attention_mask=mask).logits
        for i, r in enumerate(rows):
            torch.testing.assert_close(batched[i, -len(r) :], model(r[None]).logits[0], atol=1e-4, rtol=1e-4)
    out = c.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(out, _greedy_by_full_forward(model, prompt, mask, 6))


def test_out_scale_default_measured_for_the_input_connection_and_saved(tmp_path):
    from compose.strategies.calm import anchor_input_rms

    c = _compose("gemma2+gpt_neox", connections=[(1, "input"), (-1, 1)], null_kv=True, window=2)
    anchor = c.model.anchor
    rms = anchor_input_rms(anchor)
    with torch.no_grad():
        emb = anchor.model.embed_tokens(torch.arange(96)[:, None])
    weights = anchor.model.embed_tokens.weight
    assert rms == pytest.approx(float(emb.pow(2).mean().sqrt()), rel=1e-4)
    # gemma multiplies its embeddings by sqrt(hidden): the measured scale includes that, the weights do not
    assert rms == pytest.approx(float(weights.pow(2).mean().sqrt()) * anchor.config.hidden_size**0.5, rel=1e-4)
    assert [float(x.scale) for x in c.model.connections] == [pytest.approx(rms), 1.0]
    _perturb(c.model)
    ids = _ids(2, 9)
    with torch.no_grad():
        ref = c.model(ids).logits
        c.model.connections[0].scale.fill_(2 * rms)
        assert not torch.allclose(c.model(ids).logits, ref)  # the scale does act
        c.model.connections[0].scale.fill_(rms)
    out = c.save(tmp_path / "calm")
    (fa, ka), (fb, kb) = PAIRS["gemma2+gpt_neox"]
    loaded = Composer.load(out, anchor=tiny_model(fa, seed=0, **ka), augment=tiny_model(fb, seed=1, **kb))
    assert loaded.strategy.config.window == 2 and loaded.strategy.config.null_kv
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, ref)

    fixed = _compose("llama+gpt2", connections=[(1, "input"), (-1, 1)], out_scale=0.5)
    assert [float(x.scale) for x in fixed.model.connections] == [0.5, 0.5]
    assert "scale" not in fixed.trainable_parameters()


def test_window_null_kv_out_scale_errors():
    llama, gpt2 = tiny_model("llama", hidden=48, heads=6), tiny_model("gpt2", seed=1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="window"):
            Composer(llama, gpt2, strategy="calm", every=2, window=bad)
    for bad in (0, -0.1, "big", True):
        with pytest.raises(ValueError, match="out_scale"):
            Composer(llama, gpt2, strategy="calm", every=2, out_scale=bad)
