"""Experiment trackers (``report_to``): accelerate's trackers, checked, placed in the run, started.

``report_to`` (a ``fit`` option and the recipe key ``train.report_to``) names one or more of
accelerate's trackers - ``tensorboard``, ``wandb``, ``mlflow`` (and ``comet_ml``, ``aim``,
``clearml``, ``dvclive``, ``swanlab``, ``trackio``) - as a list or a comma-separated string;
``auto`` (the default) is TensorBoard when it is installed and the run has an ``output_dir``;
``None`` logs to none. Each tracker receives exactly the entries written to ``metrics.jsonl``
(loss, learning rate, gradient norm, throughput, eval loss), at the same steps, and the run's
options as its config.

Where the records go:

* ``tensorboard``: ``<output_dir>/compose/`` (event files);
* ``wandb``: the project ``$WANDB_PROJECT`` (default ``compose``), local files under
  ``<output_dir>/wandb``; ``WANDB_MODE=offline`` keeps everything local;
* ``mlflow``: the experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``compose``) of the tracking
  server or store ``$MLFLOW_TRACKING_URI`` names (MLflow's own default when unset).

A name that is not a tracker is an error listing the accepted ones; a tracker whose package is
not installed is an error saying what to install (accelerate would silently log to nothing).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .rules import OptionError

__all__ = ["TRACKERS", "check_report_to", "resolve_trackers", "project_name", "init_kwargs", "finish"]

#: accepted names and the package each one needs.
TRACKERS: dict[str, str] = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}
_NONE = (None, "none", "None", "", [], ())


def check_report_to(value: Any) -> str | list[str] | None:
    """``None``, ``"auto"``, or a list of tracker names (from a list or ``"a,b"``); unknown names are errors."""
    if isinstance(value, (list, tuple)) and len(value) == 0 or value in _NONE:
        return None
    if value == "auto":
        return "auto"
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise OptionError(
            f"report_to={value!r} is not accepted; expected 'auto', None, or tracker names such as "
            f"['tensorboard', 'wandb'] (accepted: {', '.join(TRACKERS)})"
        )
    out: list[str] = []
    for name in (n.strip() for n in names):
        if name not in TRACKERS:
            raise OptionError(
                f"report_to names {name!r}, which is not a tracker; accepted: {', '.join(TRACKERS)} "
                "(or 'auto', or None for no tracker)"
            )
        if name not in out:
            out.append(name)
    return out


def _installed(name: str) -> bool:
    from accelerate.utils import imports

    check = getattr(imports, f"is_{name}_available", None)
    return bool(check()) if check is not None else False


def resolve_trackers(report_to: Any, output_dir: str | os.PathLike | None) -> list[str] | None:
    """The trackers a run starts: ``auto`` resolved, each one installed and given what it needs."""
    value = check_report_to(report_to)
    if value is None:
        return None
    if value == "auto":
        return ["tensorboard"] if output_dir is not None and _installed("tensorboard") else None
    missing = [n for n in value if not _installed(n)]
    if missing:
        packages = " ".join(TRACKERS[n] for n in missing)
        raise OptionError(
            f"report_to names {', '.join(missing)}, not installed here: pip install {packages} "
            "(or pip install 'compose-llm[trackers]'), or leave it out of report_to"
        )
    if "tensorboard" in value and output_dir is None:
        raise OptionError("report_to=tensorboard writes its event files into output_dir: set output_dir")
    return value


def project_name(trackers: list[str]) -> str:
    """The project / experiment name the trackers log under."""
    if "wandb" in trackers and os.environ.get("WANDB_PROJECT"):
        return os.environ["WANDB_PROJECT"]
    return "compose"


def init_kwargs(trackers: list[str], output_dir: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """Per-tracker ``init_trackers`` keywords: wandb's local files inside the run's directory."""
    out: dict[str, dict[str, Any]] = {}
    if "wandb" in trackers and output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        out["wandb"] = {"dir": str(output_dir)}
    return out


def finish(accelerator: Any) -> None:
    """Close the trackers. Not ``accelerator.end_training()``: that also destroys the process group, which a
    distributed run still needs afterwards (gathering the weights, saving, evaluating)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
