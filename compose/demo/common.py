"""Helpers shared by the demo's experiments: small models, fit options, tables, plots."""

from __future__ import annotations

from typing import Any

import torch


# ============================================================================ helpers
def _log(msg: str) -> None:
    print(msg, flush=True)


def _llama(vocab: int, hidden: int, layers: int, heads: int, positions: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def _gpt2(vocab: int, hidden: int, layers: int, heads: int, positions: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


def _fit_options(steps: int, lr: float, batch_size: int, seq_len: int, seed: int, **kw: Any) -> dict[str, Any]:
    return dict(
        max_steps=steps,
        learning_rate=lr,
        batch_size=batch_size,
        seq_len=seq_len,
        warmup_ratio=0.05,
        weight_decay=0.0,
        progress=False,
        log_every=max(1, steps // 10),
        report_to=None,
        seed=seed,
        **kw,
    )


def _n_trainable(c) -> int:
    return sum(p.numel() for p in c.trainable_parameters().values())


def _markdown(rows: list[dict[str, Any]], digits: int = 2) -> str:
    from ..evaluate import format_table

    return format_table(rows, digits=digits)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
