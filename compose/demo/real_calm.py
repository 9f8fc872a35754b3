"""CALM for a low-resource language on real models: Chichewa -> English (the shape of the paper's Table 2).

* m_A (augmenting): SmolLM2-135M trained further on the Chichewa Bible (stage 1, full
  fine-tuning; the held-out books excluded).
* m_B (anchor): SmolLM2-135M as it ships.
* Composition data: Chichewa -> English verse pairs from the training books, in the prompt
  format used for evaluation (``Chichewa: ...`` / ``English: ...``), loss on the English side.
  The same pairs train the two controls: m_B + LoRA with CALM's trainable-parameter count (the
  paper's control) and m_B fully fine-tuned.
* Evaluation: held-out books, few-shot prompted (3 fixed pairs from the training books), greedy
  decoding to the end of the line, chrF (sacrebleu) against the World English Bible; and English
  bits per byte (World English Bible chapters of the held-out books) of each model.

Every stage writes ``result.json`` (and its model) under ``out`` and is skipped when present, so a
killed run continues. The texts may have been in the models' pretraining data.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import _log, _n_trainable, bind_out, report_run
from .real import fit_resumable, lora_rank_for, prepare, record_frozen_check, recorded_frozen_check

HELD_OUT_BOOKS = ("Ruth", "Jonah", "Phil")
"""Whole books kept out of every training set (narrative, prophecy, a letter)."""


@dataclass
class RealCalmConfig:
    model: str = "smollm2"
    seq_len: int = 256
    batch_size: int = 4
    stage1_steps: int = 60
    stage1_lr: float = 1e-4
    steps: int = 40
    calm_lr: float = 1e-3
    lora_lr: float = 2e-4
    ft_lr: float = 5e-5
    every: int = 6
    """A connection every 6th augmenting layer (5 connections on 30 layers; the paper: every 4th)."""
    shots: int = 3
    test_pairs: int = 40
    max_new_tokens: int = 48
    seed: int = 0
    threads: int | None = None


QUICK_REAL_CALM = RealCalmConfig(stage1_steps=12, steps=12, test_pairs=10, max_new_tokens=40)
"""The demo's quick version (``python -m compose.demo --real``): the same stages, fewer steps and pairs."""


def parallel_verses(root=None) -> list[tuple[str, str, str]]:
    """``(book, chichewa, english)`` for every verse both Bibles have (Protestant canon, book order)."""
    from ..tasks.real import chichewa_bible, web_bible

    web = web_bible(root)
    order: list[str] = []
    for book, *_ in web:
        if not order or order[-1] != book:
            order.append(book)
    nt_start = order.index("Matt")
    canon = order[:39] + order[nt_start : nt_start + 27]  # WEB puts the deuterocanon after Malachi
    english = {(b, c, v): t for b, c, v, t in web}
    return [
        (canon[n - 1], ny, english[(canon[n - 1], c, v)])
        for n, c, v, ny in chichewa_bible(root)
        if (canon[n - 1], c, v) in english
    ]


def _pair_text(ny: str, en: str | None = None) -> str:
    return f"Chichewa: {ny}\nEnglish:" + (f" {en}\n" if en is not None else "")


def _splits(cfg: RealCalmConfig, root=None) -> dict[str, Any]:
    import random

    pairs = parallel_verses(root)
    train = [p for p in pairs if p[0] not in HELD_OUT_BOOKS]
    test = [p for p in pairs if p[0] in HELD_OUT_BOOKS]
    rng = random.Random(cfg.seed)
    shots = rng.sample(train, cfg.shots)
    rest = [p for p in train if p not in shots]
    rng.shuffle(rest)
    return {
        "chichewa_train": [" ".join(ny for _, ny, _ in rest[i : i + 20]) for i in range(0, len(rest), 20)],
        "composition": [{"prompt": _pair_text(ny), "completion": f" {en}\n"} for _, ny, en in rest],
        "shots": shots,
        "test": rng.sample(test, min(cfg.test_pairs, len(test))),
        "english_test": [" ".join([en for b, _, en in test if b == book][:30]) for book in HELD_OUT_BOOKS],
        "chichewa_test": [" ".join([ny for b, ny, _ in test if b == book][:30]) for book in HELD_OUT_BOOKS],
    }


def _translate(c, split: dict[str, Any], cfg: RealCalmConfig) -> tuple[float, list[str]]:
    import sacrebleu
    import torch

    prefix = "".join(_pair_text(ny, en) for _, ny, en in split["shots"])
    tok = c.tokenizer
    hyps = []
    for _, ny, _ in split["test"]:
        ids = tok(prefix + _pair_text(ny), return_tensors="pt")
        with torch.no_grad():
            out = c.generate(
                ids["input_ids"],
                attention_mask=ids["attention_mask"],
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
            )
        text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        hyps.append(text.split("\n")[0].strip())
    refs = [en for _, _, en in split["test"]]
    return sacrebleu.corpus_chrf(hyps, [refs]).score, hyps


_COLUMNS = ("model", "trainable", "chrF", "English bpb")


def _score(name: str, c, split, cfg: RealCalmConfig, out: Path, trainable: int) -> dict:
    done = out / name / "result.json"
    if done.is_file():
        return {k: v for k, v in json.loads(done.read_text()).items() if k in _COLUMNS}
    t = time.time()
    chrf, hyps = _translate(c, split, cfg)
    english = c.evaluate(split["english_test"], seq_len=512, batch_size=4)["bits_per_byte"]
    row = {"model": name, "trainable": trainable, "chrF": chrf, "English bpb": english}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({**row, "hypotheses": hyps[:10], "eval_s": round(time.time() - t)}, indent=1))
    _log(f"[calm-ny] {name:14s} chrF {chrf:.1f}  English {english:.4f} bpb")
    return row


def _chichewa_bpb(out: Path, models: dict[str, Any], split: dict[str, Any]) -> dict[str, float]:
    """Bits per byte of held-out Chichewa (the same books and verses as the English test) per model:
    whether stage 1 taught m_A the language CALM is meant to borrow."""
    done = out / "chichewa_bpb.json"
    if done.is_file():
        return json.loads(done.read_text())
    scores = {
        name: c.evaluate(split["chichewa_test"], seq_len=512, batch_size=4)["bits_per_byte"]
        for name, c in models.items()
    }
    done.write_text(json.dumps(scores, indent=1))
    _log("[calm-ny] Chichewa bits per byte: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return scores


def run_real_calm(cfg: RealCalmConfig, out: str | Path, root=None) -> dict[str, Any]:
    """Stage 1 (m_A), then CALM and the two controls; each scored; the table."""
    from .. import Composer

    out = Path(out)
    bind_out(out, cfg)
    path = str(prepare(cfg, root))
    split = _splits(cfg, root)
    rows = [_score("m_B", Composer(path, strategy="full"), split, cfg, out, 0)]
    m_a_dir = out / "m_A" / "run" / "final"
    if not m_a_dir.is_dir():
        _log("[calm-ny] stage 1: m_A = SmolLM2 trained on the Chichewa Bible")
        stage1 = Composer(path, strategy="full")
        fit_resumable(
            stage1, split["chichewa_train"], cfg, steps=cfg.stage1_steps, lr=cfg.stage1_lr, out=out / "m_A" / "run",
            save_final=True,
        )  # fmt: skip
    m_a = Composer.load(m_a_dir)
    rows.append(_score("m_A", m_a, split, cfg, out, 0))
    chichewa = _chichewa_bpb(out, {"m_B": Composer(path, strategy="full"), "m_A": m_a}, split)
    calm = Composer(path, m_a.model, strategy="calm", every=cfg.every)
    n_calm = _n_trainable(calm)
    if not (out / "CALM" / "result.json").is_file():
        fit_resumable(calm, split["composition"], cfg, steps=cfg.steps, lr=cfg.calm_lr, out=out / "CALM" / "run")
        record_frozen_check(out / "CALM", calm.model, path, str(m_a_dir))
    rows.append(_score("CALM", calm, split, cfg, out, n_calm))
    unchanged = recorded_frozen_check(out / "CALM", out / "real_calm.json")
    _log(f"[calm-ny] anchor and augmenting model bit-identical to their sources after training: {unchanged}")
    del calm
    rank = lora_rank_for(path, n_calm)
    lora = Composer(path, strategy="lora", r=rank, alpha=2 * rank)
    if not (out / "m_B+LoRA" / "result.json").is_file():
        fit_resumable(lora, split["composition"], cfg, steps=cfg.steps, lr=cfg.lora_lr, out=out / "m_B+LoRA" / "run")
    rows.append(_score("m_B+LoRA", lora, split, cfg, out, _n_trainable(lora)))
    ft = Composer(path, strategy="full")
    if not (out / "m_B fine-tuned" / "result.json").is_file():
        fit_resumable(ft, split["composition"], cfg, steps=cfg.steps, lr=cfg.ft_lr, out=out / "m_B fine-tuned" / "run")
    rows.append(_score("m_B fine-tuned", ft, split, cfg, out, _n_trainable(ft)))
    result = {
        "config": asdict(cfg), "rows": rows, "lora_rank": rank, "held_out_books": HELD_OUT_BOOKS,
        "frozen_models_unchanged": unchanged, "chichewa_bpb": chichewa,
    }  # fmt: skip
    (out / "real_calm.json").write_text(json.dumps(result, indent=1))
    return report(out)


def report(out: str | Path) -> dict[str, Any]:
    """The finished run's table (printed) and plot (``real_calm.png`` beside ``real_calm.json``), from its JSON."""
    return report_run(out, "real_calm", ["chrF", "English bpb"], "Chichewa -> English, held-out books (SmolLM2-135M)")
