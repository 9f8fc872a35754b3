"""Measure compose's own ``calm`` strategy with bench/peers/protocol.py.

Same tiny Gemma models, same connections and same measurements as the scripts for the
public implementations, so the numbers sit in one table (docs/calm.md)::

    PYTHONPATH=$PWD python bench/peers/compose_calm.py --out bench/peers/results/compose.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import platform

import torch
from transformers import AutoModelForCausalLM, GemmaConfig

from bench.peers.protocol import CONNECTIONS, TINY_GEMMA, measure, randomize_, report
from compose import Composer


def tiny(seed: int):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(GemmaConfig(**TINY_GEMMA))
    randomize_(list(model.named_parameters()), seed)
    return model.eval()


def run() -> dict:
    anchor, augment = tiny(0), tiny(1)
    reference = copy.deepcopy(anchor)
    # copy_model=False: compose uses these objects, so their embeddings can be watched.
    c = Composer(anchor, augment, strategy="calm", connections=CONNECTIONS, copy_model=False)

    def composed(ids, mask):
        return c.model(input_ids=ids, attention_mask=mask).logits

    def anchor_alone(ids, mask):
        return reference(input_ids=ids, attention_mask=mask).logits

    def generate(prompt, n):
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
        try:
            out = c.generate(
                prompt, torch.ones_like(prompt), return_dict_in_generate=True, output_logits=True, **kwargs
            )
            return out.sequences, torch.stack(out.logits, dim=1)
        except (TypeError, ValueError):  # a decoder without transformers' output options
            return c.generate(prompt, torch.ones_like(prompt), max_new_tokens=n, do_sample=False)

    return measure(
        composed=composed,
        anchor=anchor_alone,
        randomize=lambda: randomize_(list(c.trainable_parameters().items()), 7),
        generate=generate,
        anchor_embed=anchor.model.embed_tokens,
        augment_embed=augment.model.embed_tokens,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {
        "implementation": "compose",
        "versions": {p: md.version(p) for p in ("torch", "transformers")},
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}",
        "default": run(),
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
