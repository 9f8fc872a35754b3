"""Train a tiny composed model (block_expand or calm); run as a subprocess by the distributed,
streaming and fault tests, alone or under ``accelerate launch``."""

import argparse
import os
import signal
import time
from pathlib import Path

import torch

from compose import Composer
from compose.testing import tiny_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--strategy", default="block_expand", choices=["block_expand", "calm"])
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--batch-size", type=int, default=2)
parser.add_argument("--save-every", type=int, default=1)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--streaming", action="store_true")
parser.add_argument("--shards", type=int, default=2)
parser.add_argument("--report", action="store_true")
args = parser.parse_args()

torch.set_num_threads(1)


def install_kill_point(point: str) -> None:
    """SIGKILL this process at a named point of checkpoint or final-model writing."""
    import compose.composer
    import compose.train.checkpoint

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    real_replace, real_train_json, real_composer_json = (
        os.replace,
        compose.train.checkpoint.write_json,
        compose.composer.write_json,
    )

    def train_json(path, obj):  # inside step 3's checkpoint, after the weights, before the rest
        if point == "checkpoint-write" and Path(path).name == "optimizer.json" and "step-0000003" in str(path):
            die()
        real_train_json(path, obj)

    def composer_json(path, obj):  # inside the final save, after the weights, before compose.json
        if point == "final-write" and ".final.tmp" in str(path):
            die()
        real_composer_json(path, obj)

    def replace(src, dst):
        if point == "checkpoint-rename" and Path(dst).name == "step-0000003":
            die()  # step 3 fully written under its hidden name, not renamed
        real_replace(src, dst)
        if point == "final-rename" and Path(dst).name.startswith(".final.old"):
            die()  # the old final moved aside, the new one not yet in place

    compose.train.checkpoint.write_json, compose.composer.write_json, os.replace = train_json, composer_json, replace


if os.environ.get("COMPOSE_TEST_KILL"):
    install_kill_point(os.environ["COMPOSE_TEST_KILL"])
rows = [torch.randint(3, 96, (24,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(32)]
if args.streaming:
    import datasets

    data = datasets.Dataset.from_dict({"input_ids": rows}).to_iterable_dataset(num_shards=args.shards)
else:
    data = [{"input_ids": r} for r in rows]
if args.strategy == "calm":
    c = Composer(tiny_model("llama", seed=0), tiny_model("llama", seed=1, layers=2), strategy="calm", every=2)
else:
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
    streaming=args.streaming,
    progress=False,
    report_to=None,
    callbacks=[lambda step, metrics: time.sleep(args.sleep)],
)
if args.report:
    from accelerate.state import AcceleratorState

    print("compose-test:", AcceleratorState().distributed_type, type(c.model).__name__, flush=True)
