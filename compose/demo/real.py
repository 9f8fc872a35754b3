"""LLaMA Pro on a real pretrained model: SmolLM2-135M adapted to Python (the shape of the paper's Table 5).

Every method trains on the same code tokens (CPython standard-library modules, one file per
document) and is scored on modules it never saw (code) and on English it never saw (World
English Bible chapters and Python tutorial prose), in bits per byte, with
:func:`compose.evaluate.evaluate_loss` (each document on its own, rolling windows). Two
settings: code only (the paper's) and code with a share of English replayed.

Methods: full fine-tuning; LoRA at a small rank and at the rank whose parameter count matches
the new blocks'; block expansion with the copies interleaved / on top / at the bottom; and the
blocks block expansion would copy trained in place, no new ones (``full`` with
``blocks="interleave:N"``). Each run writes ``<out>/<setting>/<method>/result.json``, and a
finished run is not run again, so a killed experiment continues where it stopped.

The texts may have been in SmolLM2's pretraining data; methods are compared with each other
on the same held-out split.
"""

from __future__ import annotations

import json
import math
import random
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .common import _log, _markdown, _n_trainable, _pyplot, bind_out

METHODS = ("full", "interleave", "lora_matched", "existing", "top", "bottom", "lora_small")


@dataclass
class RealLlamaProConfig:
    """Sizes of the real-model LLaMA Pro experiment (defaults: the full run; ``QUICK_REAL`` for the demo)."""

    model: str = "smollm2"
    seq_len: int = 256
    batch_size: int = 4
    steps: int = 30
    num_blocks: int = 6
    """New blocks (30 -> 36, +20%; LLaMA Pro: 32 -> 40)."""
    lora_small: int = 8
    lrs: dict[str, float] = field(
        default_factory=lambda: {"full": 5e-5, "lora": 2e-4, "block_expand": 2e-4, "existing": 5e-5}
    )
    replay: float = 0.4
    """Share of the training characters that are English in the replay setting (0: code only)."""
    train_chars: int = 400_000
    eval_doc_chars: int = 6_000
    """Each held-out document is cut at the first line end past this many characters."""
    eval_chars: int = 16_000
    """Characters of each held-out set (code, English)."""
    methods: tuple[str, ...] = METHODS
    settings: tuple[str, ...] = ("code", "replay")
    replay_methods: tuple[str, ...] = ("full", "lora_matched", "interleave", "existing")
    """Methods also run with English replay (all of ``methods`` run on code only)."""
    seed: int = 0
    threads: int | None = None


QUICK_REAL = RealLlamaProConfig(
    steps=12,
    train_chars=120_000,
    eval_chars=8_000,
    methods=("full", "lora_matched", "interleave", "top"),
    settings=("code",),
)


def _cut(text: str, chars: int) -> str:
    end = text.find("\n", chars)
    return text if end < 0 else text[: end + 1]


def _take(docs: list[str], chars: int, per_doc: int | None = None) -> list[str]:
    out, total = [], 0
    for d in docs:
        d = _cut(d, per_doc) if per_doc else d
        if total >= chars:
            break
        out.append(d)
        total += len(d)
    return out


def corpora(cfg: RealLlamaProConfig, root=None) -> dict[str, list[str]]:
    """Train code / English replay and held-out code / English, deterministic for a machine's Python."""
    from ..tasks.corpora import stdlib_files
    from ..tasks.real import python_docs, split_by_name, web_bible

    root_dir = Path(sysconfig.get_paths()["stdlib"])
    files = {str(p.relative_to(root_dir)): p for p in stdlib_files(root_dir)}  # split by module path, not install path
    train_names, test_names = split_by_name(sorted(files), 0.1)

    def read(names: list[str]) -> list[str]:
        texts = (files[n].read_text(encoding="utf-8", errors="replace") for n in names)
        return [t for t in texts if t.strip()]

    rng = random.Random(cfg.seed)
    code_train = read(train_names)
    rng.shuffle(code_train)
    chapters: dict[str, list[str]] = {}
    for book, ch, _, text in web_bible(root):
        chapters.setdefault(f"{book}.{ch}", []).append(text)
    web_train, web_test = split_by_name(sorted(chapters), 0.05)
    docs = python_docs(root)
    doc_train, doc_test = split_by_name(sorted(docs), 0.1)
    english_train = [" ".join(chapters[c]) for c in web_train] + [docs[d] for d in doc_train]
    rng.shuffle(english_train)
    half = cfg.eval_chars // 2
    english_test = _take([" ".join(chapters[c]) for c in web_test], half, cfg.eval_doc_chars)
    english_test += _take([docs[d] for d in doc_test], half, cfg.eval_doc_chars)
    return {
        "code_train": _take(code_train, cfg.train_chars),
        "english_train": _take(english_train, cfg.train_chars),
        "code_test": _take(read(test_names), cfg.eval_chars, cfg.eval_doc_chars),
        "english_test": english_test,
    }


def _train_docs(data: dict[str, list[str]], setting: str, replay: float) -> list[str]:
    if setting == "code":
        return list(data["code_train"])
    n_code = sum(map(len, data["code_train"]))
    english = _take(data["english_train"], int(n_code * replay / (1 - replay)))
    docs = data["code_train"] + english
    random.Random(1).shuffle(docs)
    return docs


def _shapes(model_dir) -> tuple[int, int, int, int, int]:
    """Hidden size, FFN size, layers, query width and key/value width of a llama-like config."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads * hd,
        c.num_key_value_heads * hd,
    )


def lora_rank_for(model_dir, params: int) -> int:
    """The LoRA rank whose adapters on every linear layer have about ``params`` parameters."""
    h, f, layers, q, kv = _shapes(model_dir)
    per_rank = layers * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + f) + (f + h))
    return max(1, round(params / per_rank))


def _lora_rank_matching(model_dir: Path, cfg: RealLlamaProConfig) -> int:
    """The LoRA rank whose adapters have the new blocks' parameter count."""
    h, f, _, q, kv = _shapes(model_dir)
    return lora_rank_for(model_dir, cfg.num_blocks * (h * q + 2 * h * kv + q * h + 3 * h * f))


def _composer(method: str, model_dir: Path, cfg: RealLlamaProConfig, rank: int):
    from .. import Composer

    if method == "full":
        return Composer(str(model_dir), strategy="full"), cfg.lrs["full"]
    if method.startswith("lora"):
        r = cfg.lora_small if method == "lora_small" else rank
        return Composer(str(model_dir), strategy="lora", r=r, alpha=2 * r), cfg.lrs["lora"]
    if method == "existing":
        return Composer(str(model_dir), strategy="full", blocks=f"interleave:{cfg.num_blocks}"), cfg.lrs["existing"]
    c = Composer(str(model_dir), strategy="block_expand", num_blocks=cfg.num_blocks, placement=method)
    return c, cfg.lrs["block_expand"]


def _measure(c, data: dict[str, list[str]], cfg: RealLlamaProConfig) -> dict[str, float]:
    code = c.evaluate(data["code_test"], seq_len=512, batch_size=4)
    english = c.evaluate(data["english_test"], seq_len=512, batch_size=4)
    return {"code_bpb": code["bits_per_byte"], "english_bpb": english["bits_per_byte"]}


def fit_resumable(c, data, cfg, *, steps: int, lr: float, out: Path, save_final: bool = False) -> None:
    """``fit`` with the real experiments' shared settings, checkpointing into ``out`` (a killed run resumes)."""
    c.fit(
        data,
        max_steps=steps,
        learning_rate=lr,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        warmup_ratio=0.06,
        weight_decay=0.0,
        seed=cfg.seed,
        progress=False,
        report_to=None,
        output_dir=str(out),
        save_every=max(1, steps // 3),
        resume=True,
        save_final=save_final,
    )


def frozen_unchanged(calm_model, *sources) -> bool:
    """Whether CALM's anchor and augmenting models are bit-identical to freshly loaded ``sources``
    (anchor first): only the composition layers may have moved."""
    import torch
    from transformers import AutoModelForCausalLM

    for model, source in zip([calm_model.anchor, *calm_model.augments], sources):
        fresh = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
        mine = model.state_dict()
        if mine.keys() != fresh.keys() or not all(torch.equal(mine[k], fresh[k]) for k in fresh):
            return False
    return True


FROZEN_CHECK = "frozen_unchanged.json"


def record_frozen_check(directory: Path, calm_model, *sources) -> bool:
    """Check :func:`frozen_unchanged` right after CALM's training and record it in ``directory``."""
    unchanged = frozen_unchanged(calm_model, *sources)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / FROZEN_CHECK).write_text(json.dumps(unchanged))
    return unchanged


def recorded_frozen_check(directory: Path, previous: Path) -> bool | None:
    """The check recorded after training (or in the run's earlier table); None if none was recorded."""
    if (directory / FROZEN_CHECK).is_file():
        return json.loads((directory / FROZEN_CHECK).read_text())
    if previous.is_file():
        return json.loads(previous.read_text()).get("frozen_models_unchanged")
    return None


def experiment_parser(doc: str, out: str, ints: tuple[str, ...]):
    """The command line shared by the real-model drivers in ``bench/``: ``--out``, ``--root``,
    ``--report`` and one integer option per name in ``ints`` (``--stage1-steps`` for ``stage1_steps``)."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", default=out)
    p.add_argument("--root", default=None, help="where models and corpora are cached (default ~/.cache/compose/real)")
    for name in ints:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--report", action="store_true", help="only print the finished runs' table and redraw the plot")
    return p


def with_args(cfg, args, names: tuple[str, ...]):
    """``cfg`` with the options among ``names`` that were given on the command line."""
    from dataclasses import replace

    return replace(cfg, **{n: getattr(args, n) for n in names if getattr(args, n) is not None})


def prepare(cfg, root=None) -> Path:
    """Threads as configured; the model's plain folder (fetched and converted on first use)."""
    import torch

    from ..tasks.real import model_dir

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return model_dir(cfg.model, root)


def run_name(method: str, cfg: RealLlamaProConfig) -> str:
    """A run's directory and table label: the method, with its learning rate where that is not the default."""
    key = _LR_KEY.get(method, "lora" if method.startswith("lora") else "block_expand")
    default = RealLlamaProConfig().lrs[key]
    return method if math.isclose(cfg.lrs[key], default) else f"{method} lr {cfg.lrs[key]:g}"


_LR_KEY = {"full": "full", "existing": "existing"}


def _run_one(method: str, setting: str, model_dir: Path, data, cfg: RealLlamaProConfig, out: Path, rank: int) -> dict:
    name = run_name(method, cfg)
    done = out / setting / name.replace(" ", "_") / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    c, lr = _composer(method, model_dir, cfg, rank)
    _log(f"[real] {setting:6s} {name:12s} lr {lr:g}, {_n_trainable(c):,} trainable")
    t = time.time()
    fit_resumable(c, _train_docs(data, setting, cfg.replay), cfg, steps=cfg.steps, lr=lr, out=done.parent / "run")
    train_s = time.time() - t
    row = {"setting": setting, "method": method, "run": name, "lr": lr, "trainable": _n_trainable(c)}
    row["train_s"] = round(train_s, 1)
    row.update(_measure(c, data, cfg))
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(row, indent=1))
    _log(f"[real] {setting:6s} {method:12s} code {row['code_bpb']:.4f}  English {row['english_bpb']:.4f} bpb")
    return row


def run_real_llama_pro(cfg: RealLlamaProConfig, out: str | Path, root=None) -> dict[str, Any]:
    """Run (or continue) every method x setting; the rows, the table and the Pareto plot."""
    from .. import Composer

    out = Path(out)
    bind_out(out, cfg, free=("methods", "settings", "replay_methods", "lrs", "threads"))  # a new rate = a new row
    path = prepare(cfg, root)
    data = corpora(cfg, root)
    base_file = out / "base.json"
    if base_file.is_file():
        base = json.loads(base_file.read_text())
    else:
        base = _measure(Composer(str(path), strategy="full"), data, cfg)
        out.mkdir(parents=True, exist_ok=True)
        base_file.write_text(json.dumps(base))
    _log(f"[real] base: code {base['code_bpb']:.4f}  English {base['english_bpb']:.4f} bpb")
    rank = _lora_rank_matching(path, cfg)
    code = [("code", m) for m in cfg.methods] if "code" in cfg.settings else []
    replay = [("replay", m) for m in cfg.replay_methods] if "replay" in cfg.settings else []
    runs = code[:4] + replay[:2] + code[4:] + replay[2:]  # the main comparisons first: a cut-short run has them
    for setting, method in runs:
        _run_one(method, setting, path, data, cfg, out, rank)
    # the table of every finished run under `out` (earlier invocations' settings included)
    result = {"config": asdict(cfg), **report(out), "lora_matched_rank": rank}
    (out / "real_llama_pro.json").write_text(json.dumps(result, indent=1))
    return result


def report(out: str | Path) -> dict[str, Any]:
    """The table and plot of the runs finished so far under ``out`` (no training, no evaluation)."""
    out = Path(out)
    base = json.loads((out / "base.json").read_text())
    rows = [json.loads(p.read_text()) for s in ("code", "replay") for p in sorted(out.glob(f"{s}/*/result.json"))]
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r["setting"] != "code", order.get(r["method"], 99), r.get("lr", 0)))
    table = summarize(rows, base)
    plot_pareto(table, out / "real_llama_pro.png")
    _log(f"base: code {base['code_bpb']:.4f}  English {base['english_bpb']:.4f} bits/byte")
    _log(_markdown(table, digits=4))
    return {"base": base, "rows": table}


def summarize(rows: list[dict], base: dict[str, float]) -> list[dict]:
    """Code gain and English change (relative, in bits per byte), and the share of full fine-tuning's gain."""
    full = {r["setting"]: base["code_bpb"] - r["code_bpb"] for r in rows if r.get("run", r["method"]) == "full"}
    table = []
    for r in rows:
        gain = base["code_bpb"] - r["code_bpb"]
        ref = full.get(r["setting"])
        table.append(
            {
                "setting": r["setting"],
                "method": r.get("run", r["method"]),
                "trainable": r["trainable"],
                "code bpb": r["code_bpb"],
                "code gain %": 100 * gain / base["code_bpb"],
                "of full FT gain %": 100 * gain / ref if ref and not math.isclose(ref, 0) else float("nan"),
                "English bpb": r["english_bpb"],
                "English change %": 100 * (r["english_bpb"] - base["english_bpb"]) / base["english_bpb"],
            }
        )
    return table


def plot_pareto(table: list[dict], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for setting, marker in (("code", "o"), ("replay", "s")):
        pts = [r for r in table if r["setting"] == setting]
        ax.scatter([r["English change %"] for r in pts], [r["code gain %"] for r in pts], marker=marker, label=setting)
        for r in pts:
            ax.annotate(
                r["method"],
                (r["English change %"], r["code gain %"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("English bits/byte change, % (lower is better)")
    ax.set_ylabel("code bits/byte gain, % (higher is better)")
    ax.set_title("SmolLM2-135M adapted to Python: gain vs forgetting")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
