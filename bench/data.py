"""Tokenize + pack throughput and memory of compose's data path, at 10 MB and 100 MB of text.

    python bench/data.py                 # corpora under /tmp/compose-bench-data, results as JSON + markdown
    python bench/data.py --sizes 10      # one size only
    python bench/data.py --num-proc 2    # tokenize/pack in 2 worker processes

For each size it writes a text corpus (paragraphs of Zipf-distributed pseudo-words,
separated by blank lines, the ``.txt`` form compose reads), trains a small byte-level BPE
with ``tokenizers`` (on the first 10 MB), then runs each measurement in a fresh
subprocess so that peak memory is that measurement's alone:

* ``tokenizer``: the tokenizer's own batched ``__call__`` over the same paragraphs, read
  1000 at a time (the reference speed: no Arrow, nothing kept);
* ``compose``: ``build_blocks(path, tokenizer, seq_len)`` with an empty datasets cache
  (read into Arrow, tokenize map, pack map, checks);
* ``compose (cached)``: the same call again: it must hit datasets' cache;
* ``fit``: ``Composer.fit(path, max_steps=2)`` on a tiny model, cache emptied first.

Peak RSS is the subprocess's ``ru_maxrss`` (it counts pages of memory-mapped Arrow files
the process touched) and, sampled every 50 ms, its peak anonymous RSS (``RssAnon``:
memory the process itself allocated). With ``--num-proc`` the workers' own peak is
reported separately (``RUSAGE_CHILDREN``). CPU seconds (user + system, all threads) are
reported beside wall time: on a shared machine their ratio moves less than the wall-time one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(path: Path, megabytes: int, seed: int = 0) -> None:
    """Paragraphs of 20-200 pseudo-words drawn from a Zipf law over 50k words, blank-line separated."""
    if path.is_file() and path.stat().st_size >= megabytes * 1_000_000:
        return
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(50_000)]
    cum_weights = list(itertools.accumulate(1.0 / (r + 1) for r in range(len(words))))
    tmp = path.with_suffix(".part")
    with open(tmp, "w") as f:
        written = 0
        while written < megabytes * 1_000_000:
            para = " ".join(rng.choices(words, cum_weights=cum_weights, k=rng.randint(20, 200))) + ".\n\n"
            f.write(para)
            written += len(para)
    os.replace(tmp, path)


def train_tokenizer(corpus: Path, out: Path, vocab: int = 8192) -> None:
    if (out / "tokenizer.json").is_file():
        return
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(corpus)], vocab_size=vocab, min_frequency=2, special_tokens=["<pad>", "<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(out)


# ---------------------------------------------------------------------------- one measurement (child)
def _rss_anon_sampler():
    import threading

    peak = {"anon_kb": 0}

    def sample():
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak["anon_kb"] = max(peak["anon_kb"], int(line.split()[1]))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    return peak


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    peak = _rss_anon_sampler()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    import compose.data  # noqa: F401 - imports are not part of the measurement

    t0, c0 = time.perf_counter(), _cpu_seconds()
    if args.what == "tokenizer":
        tokens = _tokenizer_alone(tok, Path(args.corpus))
        extra = {}
    elif args.what == "fit":
        tokens, extra = _fit(tok, args)
    else:
        from compose.data import build_blocks

        blocks = build_blocks(args.corpus, tok, args.seq_len, cache_dir=args.cache, num_proc=args.num_proc)
        tokens = blocks.num_tokens
        extra = {"blocks": len(blocks), "cache_files": len(blocks.dataset.cache_files)}
    elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    time.sleep(0.06)
    out = {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed, "cpu_seconds": cpu}
    out["peak_rss_mb"] = ru / 1024
    out.update({"peak_anon_mb": peak["anon_kb"] / 1024, "workers_peak_rss_mb": kids / 1024, **extra})
    print("RESULT " + json.dumps(out))


def _cpu_seconds() -> float:
    """CPU time of this process, all threads (less sensitive than wall time to other load on the machine)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _tokenizer_alone(tok, corpus: Path) -> int:
    tokens, batch = 0, []
    with open(corpus) as f:
        for para in _paragraphs(f):
            batch.append(para)
            if len(batch) == 1000:
                tokens += sum(len(ids) + 1 for ids in tok(batch)["input_ids"])
                batch = []
    if batch:
        tokens += sum(len(ids) + 1 for ids in tok(batch)["input_ids"])
    return tokens


def _paragraphs(f):
    buf = []
    for line in f:
        if line.strip():
            buf.append(line.rstrip("\n"))
        elif buf:
            yield "\n".join(buf)
            buf = []
    if buf:
        yield "\n".join(buf)


def _fit(tok, args):
    from compose import Composer
    from compose.testing import tiny_model

    model = tiny_model("llama", vocab=len(tok), positions=args.seq_len)
    c = Composer(model, strategy="block_expand", num_blocks=1, tokenizer=tok, copy_model=False)
    c.fit(args.corpus, max_steps=2, batch_size=2, seq_len=args.seq_len, data_cache_dir=args.cache,
          num_proc=args.num_proc, progress=False, report_to=None)  # fmt: skip
    return 0, {"steps": len(c.history)}


# ---------------------------------------------------------------------------- driver
def run_child(what: str, corpus: Path, tok: Path, cache: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--corpus", str(corpus), "--tokenizer", str(tok)]
    cmd += ["--cache", str(cache), "--seq-len", str(args.seq_len)]
    if args.num_proc:
        cmd += ["--num-proc", str(args.num_proc)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} on {corpus} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "compose-bench-data"))
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="corpus sizes in MB")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--num-proc", type=int, default=None)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "data_cpu.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.what = args.child
        return child(args)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    corpora = {mb: root / f"corpus_{mb}MB.txt" for mb in args.sizes}
    for mb, path in corpora.items():
        make_corpus(path, mb)
    tok = root / "bpe"
    train_tokenizer(corpora[min(corpora)], tok)
    results = {}
    for mb, path in corpora.items():
        cache = root / f"cache_{mb}"
        shutil.rmtree(cache, ignore_errors=True)
        row = {"tokenizer": run_child("tokenizer", path, tok, cache, args)}
        row["compose"] = run_child("compose", path, tok, cache, args)
        row["compose_cached"] = run_child("compose", path, tok, cache, args)
        shutil.rmtree(cache, ignore_errors=True)
        row["fit"] = run_child("fit", path, tok, cache, args)
        shutil.rmtree(cache, ignore_errors=True)
        results[f"{mb}MB"] = row
        print(f"{mb} MB: " + json.dumps(row), flush=True)
    import torch

    meta = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU", "torch": torch.__version__}
    meta.update({"seq_len": args.seq_len, "num_proc": args.num_proc, "python": platform.python_version()})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    lines = [
        "| corpus | run | tokens | seconds | tokens/s | vs tokenizer | CPU s | vs tokenizer (CPU) | peak RSS (MB) "
        "| peak anon RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, row in results.items():
        base, base_cpu = row["tokenizer"]["tokens_per_s"], row["tokenizer"].get("cpu_seconds")
        for name, r in row.items():
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if name != "fit" else "-"
            cpu = r.get("cpu_seconds")
            cpu_ratio = f"{base_cpu / cpu:.2f}x" if name != "fit" and cpu and base_cpu else "-"
            tokens = f"{r['tokens']:,}" if name != "fit" else "-"
            lines.append(
                f"| {size} | {name} | {tokens} | {r['seconds']:.1f} | "
                f"{r['tokens_per_s'] if name != 'fit' else 0:,.0f} | {ratio} | "
                f"{cpu if cpu is not None else float('nan'):.1f} | {cpu_ratio} | {r['peak_rss_mb']:.0f} | "
                f"{r['peak_anon_mb']:.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
