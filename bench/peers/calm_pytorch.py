"""Measure lucidrains/CALM-pytorch 0.2.2 with bench/peers/protocol.py.

Its code is used as published; only the glue a user would write is here: the anchor and
augment are transformers Gemma models wrapped to return logits (CALM-pytorch expects a
module that maps token ids to a logits tensor), their decoder blocks are passed as
``transformer_blocks``, and the connections are the protocol's (1-based in CALM-pytorch).

Install it into a throwaway folder (not your environment), then run from the repository root::

    pip install --no-deps --target /tmp/calm_pytorch CALM-pytorch==0.2.2 x-transformers==1.37.9 \\
        pytorch-custom-utils==0.0.21 pytorch-warmup==0.2.0 beartype==0.19.0
    PYTHONPATH=/tmp/calm_pytorch:$PWD python bench/peers/calm_pytorch.py --out bench/peers/results/calm_pytorch.json

x-transformers 1.37.9 is the release current when CALM-pytorch 0.2.2 came out; its other
dependencies (torch, einops, accelerate, tqdm) come from the environment.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import platform

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GemmaConfig

from bench.peers.protocol import CONNECTIONS, PAD, TINY_GEMMA, measure, randomize_, report


class LogitsOnly(nn.Module):
    """ids -> logits, the interface CALM-pytorch calls (``mask_kwarg`` names the mask argument)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, attention_mask=None):
        return self.model(input_ids=ids, attention_mask=attention_mask).logits


def tiny(seed: int):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(GemmaConfig(**TINY_GEMMA))
    randomize_(list(model.named_parameters()), seed)
    return model.eval()


def _keep_top(logits):
    return logits.masked_fill(logits < logits.max(-1, keepdim=True).values, float("-inf"))


def build(causal: bool):
    from CALM_pytorch import CALM, AugmentParams

    anchor, augment = tiny(0), tiny(1)
    reference = copy.deepcopy(anchor)  # CALM-pytorch hooks the anchor's blocks for good
    attn_kwargs = dict(linear_project_context=True, pre_rmsnorm=True, flash=True)  # the library's default
    if causal:
        attn_kwargs["causal"] = True
    calm = CALM(
        anchor_llm=LogitsOnly(anchor),
        augment_llms=AugmentParams(
            model=LogitsOnly(augment),
            transformer_blocks=list(augment.model.layers),
            connections=tuple((a + 1, b + 1) for a, b in CONNECTIONS),
            mask_kwarg="attention_mask",
        ),
        anchor_transformer_blocks=list(anchor.model.layers),
        attn_kwargs=attn_kwargs,
        pad_id=PAD,
    )
    return calm.eval(), anchor, augment, reference


def run(causal: bool) -> dict:
    calm, anchor, augment, reference = build(causal)

    def composed(ids, mask):
        # CALM-pytorch derives the augment's mask from pad_id; the anchor gets no mask.
        return calm(ids, prompt=ids, return_loss=False)

    def anchor_alone(ids, mask):
        return reference(input_ids=ids, attention_mask=mask).logits

    def generate(prompt, n):
        # Keeping only the top logit makes its Gumbel sampler greedy (its own `top_k` filter
        # raises NameError: `ceil` is not imported in sampling_utils). seq_len is the total length.
        out = calm.generate(prompt, seq_len=prompt.shape[1] + n, filter_fn=_keep_top, filter_kwargs={})
        out = out[0] if isinstance(out, (list, tuple)) else out[0]
        out = out.reshape(1, -1)
        return out if out.shape[1] == prompt.shape[1] + n else torch.cat([prompt, out], dim=1)

    res = measure(
        composed=composed,
        anchor=anchor_alone,
        randomize=lambda: randomize_(list(calm.cross_attns.named_parameters()), 7),
        generate=generate,
        anchor_embed=anchor.model.embed_tokens,
        augment_embed=augment.model.embed_tokens,
    )
    res["attn_kwargs_causal"] = causal
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {
        "implementation": "lucidrains/CALM-pytorch",
        "versions": {p: md.version(p) for p in ("CALM-pytorch", "x-transformers", "torch", "transformers")},
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}",
        "default": run(causal=False),
        "attn_kwargs={'causal': True}": run(causal=True),
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
