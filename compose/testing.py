"""Tiny random models of every supported family, for tests, demos and recipe dry runs.

No weights are downloaded: each model is built from a config and then *every* parameter
is re-drawn at random (including biases and norm weights), so that an invariant holding
on these models is not an accident of zero biases or unit norms.

>>> from compose.testing import tiny_model
>>> model = tiny_model("llama", seed=0)
>>> model.config.num_hidden_layers
4
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

__all__ = [
    "TINY_FAMILIES",
    "TINY_VARIANTS",
    "TINY_PREFIX",
    "tiny_config",
    "tiny_model",
    "tiny_tokenizer",
    "randomize_",
    "parse_tiny_spec",
    "tiny_from_spec",
]

VOCAB = 96


def tiny_config(
    family: str,
    *,
    hidden: int = 32,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = VOCAB,
    positions: int = 128,
    tie: bool | None = None,
    ffn: int = 2,
    bias: bool = True,
):
    """A small config of ``family`` (a ``model_type``), dropout off.

    ``ffn``: MLP width as a multiple of ``hidden``. ``bias``: switch biases on where the
    family makes them optional (Llama, Qwen3), so invariants are tested with biases.
    """
    sizes = dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab, positions=positions)
    families = _family_configs(**sizes, ffn=ffn, bias=bias)
    if family not in families:
        raise ValueError(f"no tiny config for family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    return _without_dropout(families[family](), tie)


def _family_configs(
    *, hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, positions: int, ffn: int, bias: bool
) -> dict[str, Callable[[], PretrainedConfig]]:
    """A maker of each family's small config, by ``model_type``."""
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn * hidden,
        max_position_embeddings=positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    llama_like = dict(common, num_key_value_heads=kv_heads)
    head_dim = hidden // heads
    families = {
        "llama": lambda: LlamaConfig(**llama_like, attention_bias=bias, mlp_bias=bias),
        "mistral": lambda: MistralConfig(**llama_like, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**llama_like, use_sliding_window=False),
        "qwen3": lambda: Qwen3Config(**llama_like, head_dim=head_dim, attention_bias=bias),
        "gemma": lambda: GemmaConfig(**llama_like, head_dim=head_dim),
        "gemma2": lambda: Gemma2Config(**llama_like, head_dim=head_dim, sliding_window=8),
        # Gemma 3 as it ships: head_dim wider than hidden / heads, one KV head, q/k norms, a 2:1
        # sliding/full layer pattern, scaled embeddings, tied head.
        "gemma3_text": lambda: Gemma3TextConfig(
            **dict(llama_like, num_key_value_heads=1),
            head_dim=2 * head_dim,
            query_pre_attn_scalar=2 * head_dim,
            sliding_window=8,
            layer_types=[("full_attention" if i % 3 == 2 else "sliding_attention") for i in range(layers)],
        ),
        "phi3": lambda: Phi3Config(**llama_like),
        "mixtral": lambda: MixtralConfig(**llama_like, num_local_experts=4, num_experts_per_tok=2),
        "gpt2": lambda: GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=positions,
            n_inner=ffn * hidden,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        "gpt_neox": lambda: GPTNeoXConfig(**common, use_parallel_residual=True),
    }
    return families


def _without_dropout(cfg, tie: bool | None):
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(cfg, key):
            setattr(cfg, key, 0.0)
    if tie is not None:
        cfg.tie_word_embeddings = tie
    return cfg


TINY_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
    "mixtral",
)
# Every family, plus the head layouts that break naive code: Llama with tied embeddings (SmolLM2's
# layout; the tiny llama is untied, as Qwen2.5-Coder's head is).
TINY_VARIANTS = TINY_FAMILIES + ("llama?tie=true",)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Re-draw every parameter of ``model`` in place (deterministic for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        param.copy_(torch.randn(param.shape, generator=gen) * std + (1.0 if param.ndim == 1 and "norm" in _ else 0.0))
    return model


def tiny_model(family: str = "llama", seed: int = 0, **config_kwargs) -> PreTrainedModel:
    """A tiny ``*ForCausalLM`` of ``family`` in fp32 eval mode with every parameter random.

    ``family`` may carry spec options, as in :data:`TINY_VARIANTS` (``"llama?tie=true"``).
    """
    if "?" in family:
        family, options = parse_tiny_spec(TINY_PREFIX + family)
        options.pop("seed", None)
        config_kwargs = {**options, **config_kwargs}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_kwargs))
    randomize_(model, seed)
    return model.eval()


# Characters of the tiny tokenizer: newline, then space .. "z" (ids 4..95 of the 96-token tiny vocab).
_TINY_CHARS = "\n" + "".join(chr(c) for c in range(32, 123))


def tiny_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` matching the tiny models' 96-token vocabulary.

    Ids 0-3 are ``<pad> <s> </s> <unk>``, then newline and the printable characters from the
    space to ``z``. Built offline; it puts ``<s>`` in front of every text, like LLaMA's.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    table = {tok: i for i, tok in enumerate(specials + list(_TINY_CHARS))}
    assert len(table) == VOCAB
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


# ---------------------------------------------------------------------------- tiny: specs
TINY_PREFIX = "tiny:"
_TINY_OPTIONS = ("seed", "hidden", "layers", "heads", "kv_heads", "positions", "tie")


def parse_tiny_spec(spec: str) -> tuple[str, dict]:
    """``"tiny:llama?hidden=48&layers=2&seed=1"`` -> ``("llama", {"hidden": 48, "layers": 2, "seed": 1})``.

    The stand-in models of recipes and the command line; a bad family, option or value is a
    ``ValueError`` naming it and what is accepted.
    """
    if not isinstance(spec, str) or not spec.startswith(TINY_PREFIX):
        raise ValueError(f"{spec!r} is not a tiny model spec (tiny:FAMILY?key=value&...)")
    family, _, query = spec[len(TINY_PREFIX) :].partition("?")
    if family not in TINY_FAMILIES:
        raise ValueError(f"{spec!r}: unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    kwargs: dict = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in _TINY_OPTIONS:
            raise ValueError(f"{spec!r}: unknown tiny option {key!r}; valid: {', '.join(_TINY_OPTIONS)}")
        if key == "tie":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{spec!r}: tie={value!r} is not accepted; expected true or false")
            kwargs[key] = value.lower() in ("true", "1")
        elif not value.isdigit() or (int(value) < 1 and key != "seed"):
            raise ValueError(f"{spec!r}: {key}={value!r} is not accepted; expected a positive integer")
        else:
            kwargs[key] = int(value)
    return family, kwargs


def tiny_from_spec(spec: str) -> PreTrainedModel:
    """The tiny random model a ``tiny:`` spec names (its ``_name_or_path`` is the spec, so it can be rebuilt)."""
    family, kwargs = parse_tiny_spec(spec)
    model = tiny_model(family, **kwargs)
    model.config._name_or_path = spec
    return model
