"""Peak memory of ``fit`` on one huge document: it must not follow the document's size.

    python bench/long_document.py                      # .txt 10 and 100 MB, .jsonl 5 and 50 MB
    python bench/long_document.py --txt 10 --jsonl     # a subset (sizes in MB; none: skip that form)

Each corpus is a single document: a ``.txt`` of lines of Zipf-drawn pseudo-words with no
blank line (so the whole file is one paragraph, one document), and a ``.jsonl`` holding one
record whose ``text`` is such a document. Each ``Composer.fit(path, max_steps=2)`` (tiny
llama, the byte-level BPE of ``bench/data.py``, an empty datasets cache) runs in a fresh
subprocess; its peak RSS (``ru_maxrss``) and peak anonymous RSS are reported, with the ratio
of the larger document to the smaller one (the acceptance: at most 1.3x, and under 1.5 GiB).
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from data import _rss_anon_sampler, make_corpus, train_tokenizer  # noqa: E402 - bench/data.py, beside this file


def _lines(megabytes: int, seed: int = 0):
    """Lines of 5-30 Zipf-drawn pseudo-words until ``megabytes`` MB, no blank line."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(50_000)]
    cum = list(itertools.accumulate(1.0 / (r + 1) for r in range(len(words))))
    written = 0
    while written < megabytes * 1_000_000:
        line = " ".join(rng.choices(words, cum_weights=cum, k=rng.randint(5, 30))) + ".\n"
        written += len(line)
        yield line


def make_document(path: Path, megabytes: int) -> None:
    if path.is_file():
        return
    tmp = path.with_suffix(".part")
    with open(tmp, "w") as f:
        if path.suffix == ".txt":
            f.writelines(_lines(megabytes))
        else:  # one JSON record, its text written in pieces (json.dumps of each line, quotes stripped)
            f.write('{"text": "')
            for line in _lines(megabytes):
                f.write(json.dumps(line)[1:-1])
            f.write('"}\n')
    os.replace(tmp, path)


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    peak = _rss_anon_sampler()
    from transformers import AutoTokenizer

    from compose import Composer
    from compose.testing import tiny_model

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    model = tiny_model("llama", vocab=len(tok), positions=args.seq_len)
    t0 = time.perf_counter()
    c = Composer(model, strategy="block_expand", num_blocks=1, tokenizer=tok, copy_model=False)
    c.fit(args.corpus, max_steps=2, batch_size=2, seq_len=args.seq_len, data_cache_dir=args.cache,
          progress=False, report_to=None)  # fmt: skip
    out = {"seconds": time.perf_counter() - t0}
    time.sleep(0.06)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_anon_mb"] = peak["anon_kb"] / 1024
    print("RESULT " + json.dumps(out))


def run_child(corpus: Path, tok: Path, cache: Path, seq_len: int) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", "--corpus", str(corpus), "--tokenizer", str(tok)]
    cmd += ["--cache", str(cache), "--seq-len", str(seq_len)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    shutil.rmtree(cache, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"fit on {corpus} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def measure(root: Path, suffix: str, sizes: list[int], seq_len: int) -> dict:
    tok = root / "bpe"
    rows = {}
    for mb in sizes:
        path = root / f"one_document_{mb}MB{suffix}"
        make_document(path, mb)
        rows[f"{mb}MB"] = run_child(path, tok, root / "cache_long", seq_len)
        print(f"{suffix} {mb} MB: {json.dumps(rows[f'{mb}MB'])}", flush=True)
    small, large = rows[f"{min(sizes)}MB"], rows[f"{max(sizes)}MB"]
    rows["ratio"] = large["peak_rss_mb"] / small["peak_rss_mb"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "compose-bench-data"))
    p.add_argument("--txt", type=int, nargs="*", default=[10, 100], help="sizes (MB) of single-document .txt files")
    p.add_argument("--jsonl", type=int, nargs="*", default=[5, 50], help="sizes (MB) of one-record .jsonl files")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "long_document_cpu.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    make_corpus(root / "corpus_10MB.txt", 10)
    train_tokenizer(root / "corpus_10MB.txt", root / "bpe")
    results = {}
    for suffix, sizes in ((".txt", args.txt), (".jsonl", args.jsonl)):
        if sizes:
            results[suffix] = measure(root, suffix, sizes, args.seq_len)
    meta = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU", "seq_len": args.seq_len}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    for suffix, rows in results.items():
        sizes = [k for k in rows if k != "ratio"]
        shown = ", ".join(f"{k}: {rows[k]['peak_rss_mb']:.0f} MB ({rows[k]['seconds']:.0f} s)" for k in sizes)
        print(f"{suffix}: peak RSS {shown}; ratio {rows['ratio']:.2f}x")


if __name__ == "__main__":
    main()
