"""Train a tiny expanded model; used by the kill/resume and DDP tests as a subprocess."""

import argparse
import time

import torch

from compose import Composer
from compose.testing import tiny_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--batch-size", type=int, default=2)
parser.add_argument("--save-every", type=int, default=2)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--resume", action="store_true")
args = parser.parse_args()

torch.set_num_threads(1)
data = [
    {"input_ids": torch.randint(3, 96, (32,), generator=torch.Generator().manual_seed(i)).tolist()} for i in range(16)
]
c = Composer(tiny_model("llama", seed=0), strategy="block_expand", num_blocks=2)
c.fit(
    data,
    max_steps=args.steps,
    learning_rate=1e-2,
    batch_size=args.batch_size,
    seq_len=16,
    warmup_ratio=0.0,
    save_every=args.save_every,
    keep_checkpoints=100,
    output_dir=args.out,
    resume=args.resume,
    progress=False,
    callbacks=[lambda step, metrics: time.sleep(args.sleep)],
)
