"""Measure google-deepmind/calm (its ``model/`` package) with bench/peers/protocol.py.

Its code pins transformers 4.42.3 (its decoder-layer hooks expect the tuple outputs of
that era), so run it against that version installed into a throwaway folder, with a
checkout of the repository on the path::

    git clone https://github.com/google-deepmind/calm /tmp/deepmind_calm   # measured at 87701cb
    pip install --no-deps --target /tmp/tf442 transformers==4.42.3 tokenizers==0.19.1 huggingface_hub==0.23.4
    PYTHONPATH=/tmp/tf442:/tmp/deepmind_calm:$PWD python bench/peers/deepmind_calm.py \\
        --out bench/peers/results/deepmind_calm.json

The anchor and augment are tiny random Gemma models saved to a temporary folder (its
``CALM`` loads both by path); connections and heads are given in its own format
(``(anchor_layer, augment_layer)``, ``num_heads`` left at its default of 1).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import tempfile
from pathlib import Path

import torch
import transformers

from bench.peers.protocol import CONNECTIONS, TINY_GEMMA, measure, randomize_, report


def tiny(seed: int):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.GemmaConfig(**TINY_GEMMA))
    randomize_(list(model.named_parameters()), seed)
    return model.eval()


def run(workdir: Path) -> dict:
    from model.calm import CALM, CALMConfig

    anchor_dir, augment_dir = workdir / "anchor", workdir / "augment"
    tiny(0).save_pretrained(anchor_dir)
    tiny(1).save_pretrained(augment_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(anchor_dir).eval()
    config = CALMConfig(
        anchor_model=str(anchor_dir),
        aug_model=str(augment_dir),
        connections=[(b, a) for a, b in CONNECTIONS],
    )
    calm = CALM(config).eval()

    def ones_if_none(ids, mask):
        # Its cross-attention hook asserts that a mask was given (then does not use it).
        return torch.ones_like(ids) if mask is None else mask

    def composed(ids, mask):
        return calm(input_ids=ids, attention_mask=ones_if_none(ids, mask), use_cache=False).logits

    def anchor_alone(ids, mask):
        return reference(input_ids=ids, attention_mask=mask).logits

    def generate(prompt, n, **kwargs):
        out = calm.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )
        return out.sequences, torch.stack(out.logits, dim=1)

    # Which cache object each model is handed on each call: CALM.forward passes the same
    # `past_key_values` to the augmenting model and then to the anchor.
    handed: list[tuple[str, str, int]] = []

    def log_cache(name):
        def hook(_module, _args, kwargs):
            pkv = kwargs.get("past_key_values")
            if pkv is None:
                handed.append((name, "None", 0))
            elif isinstance(pkv, transformers.Cache):
                handed.append((name, type(pkv).__name__, int(pkv.get_seq_length())))
            else:
                handed.append((name, "tuple", int(pkv[0][0].shape[2])))

        return hook

    result = {"is_PreTrainedModel": isinstance(calm, transformers.PreTrainedModel)}
    embeds = dict(anchor_embed=calm.anchor_model.model.embed_tokens, augment_embed=calm.aug_model.model.embed_tokens)
    hooks = [
        calm.aug_model.register_forward_pre_hook(log_cache("augment"), with_kwargs=True),
        calm.anchor_model.register_forward_pre_hook(log_cache("anchor"), with_kwargs=True),
    ]
    result["cached_generate"] = measure(
        composed=composed,
        anchor=anchor_alone,
        randomize=lambda: None,  # its connections are already active at init
        generate=generate,
        **embeds,
    )
    for h in hooks:
        h.remove()
    # the calls of the decoding part only: generate runs after the forward-only measurements
    result["cache_handed_per_call"] = [c for c in handed if c[1] != "None" or c[2]][:8] or handed[-16:]
    result["uncached_generate"] = measure(
        composed=composed,
        anchor=anchor_alone,
        randomize=lambda: None,
        generate=lambda p, n: generate(p, n, use_cache=False),
        **embeds,
    )["decode"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        measured = run(Path(tmp))
    result = {
        "implementation": "google-deepmind/calm",
        "versions": {p: md.version(p) for p in ("torch", "transformers")},
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}",
        **measured,
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
