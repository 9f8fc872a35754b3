"""Helpers of the multi-process tests: run a launch, kill one after a checkpoint, read saved weights.

Imported by the test modules beside it (pytest puts this directory on ``sys.path``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this one's, with the repository first on ``PYTHONPATH``
    (an existing ``PYTHONPATH`` is kept after it: the low-end dependency run of ``.ci/run`` sets one)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


ENV = child_env(OMP_NUM_THREADS="1")


def run(cmd: list[str]) -> str:
    """Run ``cmd`` to the end; its stdout, or a failure showing the tail of its output."""
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its workers in their own sessions)."""
    import psutil

    parent = psutil.Process(pid)
    procs = parent.children(recursive=True) + [parent]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def kill_after_checkpoint(cmd: list[str], out: Path, step: int = 2) -> str:
    """Start ``cmd`` (a training run writing to ``out``), kill -9 its whole process tree as soon as
    checkpoint ``step`` exists, and return what it printed until then."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / f"step-{step:07d}").exists():
        assert proc.poll() is None, f"the run ended before it could be killed: {cmd}"
        time.sleep(0.05)
    kill_tree(proc.pid)
    return proc.communicate()[0].decode()


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model saved in ``out/final``, keyed ``file:name``."""
    files = sorted((out / "final").glob("*.safetensors"))
    assert files, sorted(p.name for p in (out / "final").iterdir())
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}
