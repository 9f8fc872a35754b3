"""CALM for code on real models, across tokenizers (the shape of the paper's Table 4).

* m_B (anchor): SmolLM2-135M-Instruct, a general model.
* m_A (augmenting): Qwen2.5-Coder-0.5B-Instruct, a code specialist with another tokenizer
  (151k vocabulary against SmolLM2's 49k); CALM aligns the two by character offsets.
* Composition data: Python standard-library modules (the training split of the LLaMA Pro
  experiment; held-out modules never trained on).
* Control: m_B + LoRA with CALM's trainable-parameter count, on the same data and steps.
* Evaluation: bits per byte on held-out standard-library modules (code) and on held-out World
  English Bible chapters and Python documentation pages (English), comparable across tokenizers;
  and greedy pass@1 on :mod:`compose.tasks.code_problems` (24 short functions, executed).

Every stage writes ``result.json`` under ``out`` and is skipped when present, so a killed run
continues. The corpora may overlap with both models' pretraining data (the standard library and
the Bible are on the web).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import _log, _n_trainable, bind_out, report_run
from .real import (
    RealLlamaProConfig,
    corpora,
    fit_resumable,
    lora_rank_for,
    prepare,
    record_frozen_check,
    recorded_frozen_check,
)


@dataclass
class RealCodeCalmConfig:
    anchor: str = "smollm2"
    augment: str = "qwen_coder"
    seq_len: int = 256
    batch_size: int = 4
    steps: int = 40
    calm_lr: float = 1e-3
    lora_lr: float = 2e-4
    every: int = 4
    """A connection every 4th augmenting layer (6 on Qwen2.5-Coder's 24 layers), as in the paper."""
    train_chars: int = 400_000
    eval_chars: int = 16_000
    eval_doc_chars: int = 6_000
    max_new_tokens: int = 96
    problems: int | None = None
    """Score the first ``problems`` problems only (default: all 24)."""
    seed: int = 0
    threads: int | None = None

    @property
    def model(self) -> str:  # what prepare() fetches first
        return self.anchor


def _completer(c, max_new_tokens: int):
    import torch

    tok = c.tokenizer

    def complete(prompt: str) -> str:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = c.generate(
                ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=max_new_tokens, do_sample=False
            )
        return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    return complete


def _score(name: str, c, data: dict, cfg: RealCodeCalmConfig, out: Path, trainable: int) -> dict:
    from ..tasks.code_problems import PROBLEMS, pass_at_1

    done = out / name / "result.json"
    if done.is_file():
        return {k: v for k, v in json.loads(done.read_text()).items() if k in _COLUMNS}
    t = time.time()
    code = c.evaluate(data["code_test"], seq_len=512, batch_size=4)["bits_per_byte"]
    english = c.evaluate(data["english_test"], seq_len=512, batch_size=4)["bits_per_byte"]
    problems = PROBLEMS[: cfg.problems] if cfg.problems else PROBLEMS
    passed, detail = pass_at_1(_completer(c, cfg.max_new_tokens), problems)
    row = {"model": name, "trainable": trainable, "code bpb": code, "English bpb": english, "pass@1": passed}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({**row, "problems": detail, "eval_s": round(time.time() - t)}, indent=1))
    _log(f"[calm-code] {name:10s} code {code:.4f} bpb  English {english:.4f} bpb  pass@1 {passed:.1f}%")
    return row


_COLUMNS = ("model", "trainable", "code bpb", "English bpb", "pass@1")


def run_real_code_calm(cfg: RealCodeCalmConfig, out: str | Path, root=None) -> dict[str, Any]:
    """m_B, m_A, CALM (m_B reading m_A) and the equal-size LoRA control, each scored; the table."""
    from .. import Composer
    from ..tasks.real import model_dir

    out = Path(out)
    bind_out(out, cfg)
    anchor = str(prepare(cfg, root))
    augment = str(model_dir(cfg.augment, root))
    data = corpora(
        RealLlamaProConfig(
            train_chars=cfg.train_chars, eval_chars=cfg.eval_chars, eval_doc_chars=cfg.eval_doc_chars, seed=cfg.seed
        ),
        root,
    )
    rows = [_score("m_B", Composer(anchor, strategy="full"), data, cfg, out, 0)]
    rows.append(_score("m_A", Composer(augment, strategy="full"), data, cfg, out, 0))
    calm = Composer(anchor, augment, strategy="calm", every=cfg.every)
    n_calm = _n_trainable(calm)
    if not (out / "CALM" / "result.json").is_file():
        fit_resumable(calm, data["code_train"], cfg, steps=cfg.steps, lr=cfg.calm_lr, out=out / "CALM" / "run")
        record_frozen_check(out / "CALM", calm.model, anchor, augment)
    rows.append(_score("CALM", calm, data, cfg, out, n_calm))
    unchanged = recorded_frozen_check(out / "CALM", out / "real_code_calm.json")
    _log(f"[calm-code] anchor and augmenting model bit-identical to their sources after training: {unchanged}")
    del calm
    rank = lora_rank_for(anchor, n_calm)
    lora = Composer(anchor, strategy="lora", r=rank, alpha=2 * rank)
    if not (out / "m_B+LoRA" / "result.json").is_file():
        fit_resumable(lora, data["code_train"], cfg, steps=cfg.steps, lr=cfg.lora_lr, out=out / "m_B+LoRA" / "run")
    rows.append(_score("m_B+LoRA", lora, data, cfg, out, _n_trainable(lora)))
    result = {"config": asdict(cfg), "rows": rows, "lora_rank": rank, "frozen_models_unchanged": unchanged}
    (out / "real_code_calm.json").write_text(json.dumps(result, indent=1))
    return report(out)


def report(out: str | Path) -> dict[str, Any]:
    """The finished run's table (printed) and plot (``real_code_calm.png`` beside ``real_code_calm.json``), from its JSON."""
    return report_run(
        out,
        "real_code_calm",
        ["code bpb", "English bpb", "pass@1"],
        "SmolLM2-135M reading Qwen2.5-Coder-0.5B (held-out code)",
    )
