"""File-system safety: atomic directories, ownership markers, run locks, atomic JSON.

compose never destroys what it did not write:

* every directory it writes whole (a saved model, an export, a checkpoint) is built in a
  hidden sibling and swapped in with renames; it carries a marker (:data:`MARKER`) listing
  the files compose wrote, so a later save replaces only those and carries any other file
  over;
* a non-empty directory without the marker is foreign: writing there is an error unless
  the caller passes ``overwrite=True``, and even then only compose's files are replaced;
* a kill between the two renames of a swap leaves hidden ``.NAME.old-*``/``.NAME.tmp-*``
  siblings; the next use of the directory (:func:`recover_directory`) puts the newest
  complete copy back and removes the leftovers;
* a training run holds :data:`LOCK_NAME` (an OS lock, with pid + host: :mod:`compose.runlock`)
  in its output directory and writes :data:`COMPLETE_NAME` last.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .runlock import LOCK_NAME, LockError, _now, output_lock

__all__ = [
    "MARKER",
    "LOCK_NAME",
    "COMPLETE_NAME",
    "OutputError",
    "atomic_directory",
    "recover_directory",
    "check_writable_target",
    "owned_files",
    "write_json",
    "write_text",
    "read_json",
    "check_safetensors",
    "output_lock",
    "LockError",
    "prepare_run_directory",
    "mark_complete",
    "is_complete",
]

MARKER = ".compose-files.json"
"""Written last into every directory compose writes whole: the names of the files it wrote."""
COMPLETE_NAME = "complete.json"
"""Written last into a run's output directory, once the final model and results are on disk."""
RUN_MARKER = ".compose-run.json"
"""Written into a run's output directory when compose starts using it."""


class OutputError(FileExistsError, ValueError):
    """A target that compose will not write into (foreign files, a finished run); says what to do.

    A ``FileExistsError`` and a ``ValueError``, so either ``except`` catches it.
    """


# ---------------------------------------------------------------------------- JSON
def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write sorted JSON atomically: a reader (or a crash) sees the old file or the whole new one."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is damaged or was not written by compose") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); the file is damaged") from None


# ---------------------------------------------------------------------------- ownership
def owned_files(directory: str | os.PathLike) -> set[str] | None:
    """The names compose wrote into ``directory`` (from its marker), or ``None`` if it has none."""
    marker = Path(directory) / MARKER
    if not marker.is_file():
        return None
    try:
        return set(json.loads(marker.read_text()).get("files", []))
    except (ValueError, OSError, AttributeError):
        return None


def _foreign(directory: Path) -> list[str]:
    """Entries of ``directory`` compose did not write (all of them when it carries no marker)."""
    if not directory.is_dir():
        return []
    own = owned_files(directory) or set()
    return sorted(p.name for p in directory.iterdir() if p.name not in own and p.name != MARKER)


def check_writable_target(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output") -> None:
    """Refuse a target that is a file, or a non-empty directory compose did not write (unless ``overwrite``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a directory; give a directory path")
    if not path.is_dir() or overwrite or owned_files(path) is not None:
        return
    foreign = _foreign(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise OutputError(
            f"{what} {path} already holds files compose did not write ({shown}); choose a new or empty "
            "directory, or pass overwrite=True (--overwrite) to write compose's files beside them"
        )


def check_replaceable(path: str | os.PathLike, *, what: str = "output") -> None:
    """Refuse to replace a directory the user made read-only (no write permission for anyone).

    The swap of :func:`atomic_directory` only needs the parent to be writable, so without this
    check a ``chmod a-w`` folder would be replaced all the same.
    """
    path = Path(path).resolve() if Path(path).is_symlink() else Path(path)
    if path.is_dir() and not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise OutputError(
            f"{what} {path} is read-only: compose will not replace it; make it writable (chmod u+w) or "
            "write somewhere else"
        )


# ---------------------------------------------------------------------------- atomic directories
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(path: Path) -> list[tuple[str, Path, int | None]]:
    """Hidden swap siblings of ``path``: ``(kind, path, writer pid)`` with kind "old" or "tmp"."""
    out = []
    if not path.parent.is_dir():
        return out
    prefix = f".{path.name}."
    for p in path.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        kind, _, tag = p.name[len(prefix) :].partition("-")
        if kind not in ("old", "tmp"):
            continue
        pid = tag.split("-")[0]
        out.append((kind, p, int(pid) if pid.isdigit() else None))
    return out


def recover_directory(path: str | os.PathLike) -> bool:
    """Undo an interrupted swap of ``path``; returns True when something was recovered or cleaned.

    If ``path`` is missing, the newest complete copy (a finished ``.tmp`` carrying the marker,
    else the ``.old`` copy) is renamed back into place. Leftovers of dead writers are removed.
    """
    path = Path(path)
    found = [(k, p, pid) for k, p, pid in _leftovers(path) if pid is None or not _pid_alive(pid) or pid == os.getpid()]
    if not found:
        return False
    if not path.exists():
        complete_tmp = [p for k, p, _ in found if k == "tmp" and (p / MARKER).is_file()]
        olds = [p for k, p, _ in found if k == "old"]
        pick = max(complete_tmp, key=lambda p: p.stat().st_mtime, default=None) or max(
            olds, key=lambda p: p.stat().st_mtime, default=None
        )
        if pick is not None:
            os.replace(pick, path)
            warnings.warn(
                f"compose: {path} was missing after an interrupted save; restored it from {pick.name}", stacklevel=2
            )
    for _, p, _ in found:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
    return True


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into ``new`` the entries of ``old`` compose did not write."""
    for name in _foreign(old):
        src, dst = old / name, new / name
        if dst.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``path``; on success it replaces ``path`` by renames.

    A run killed mid-way never leaves a ``path`` that looks complete but is not, and never
    leaves ``path`` missing for good (:func:`recover_directory` runs first). A non-empty
    ``path`` compose did not write is an :class:`OutputError` unless ``overwrite``; files in
    ``path`` that compose did not write are kept (carried into the new directory).
    """
    path = Path(path)
    if path.is_symlink():  # write into the link's target: the link itself stays as the user made it
        path = path.resolve()
    recover_directory(path)
    check_writable_target(path, overwrite=overwrite, what=what)
    check_replaceable(path, what=what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if path.is_dir():
            _carry_over(path, tmp)
        ours = sorted(p.name for p in tmp.iterdir() if p.name not in _foreign_names(path))
        write_json(tmp / MARKER, {"files": ours, "written_by": "compose"})
    except BaseException as e:
        full = _disk_full_error(e, tmp, path)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from e
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{tag}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _disk_full_error(error: BaseException, tmp: Path, path: Path) -> OSError | None:
    """A full disk, named with the file being written (safetensors' own error names none)."""
    text = str(error)
    if not (getattr(error, "errno", None) == errno.ENOSPC or "StorageFull" in text or "No space left" in text):
        return None
    named = getattr(error, "filename", None)
    if named:
        newest = Path(named)
    else:  # the file being written is the newest one in the temporary folder
        files = [p for p in tmp.rglob("*") if p.is_file()]
        newest = max(files, key=lambda p: p.stat().st_mtime_ns, default=None)
    where = f"{newest.name} of {path}" if newest is not None else str(path)
    return OSError(
        errno.ENOSPC,
        f"the disk is full (No space left on device): writing {where} failed; nothing was replaced (the previous "
        f"{path.name} is intact). Free some space on {path.parent} and run again",
    )


def _foreign_names(path: Path) -> set[str]:
    return set(_foreign(path)) if path.is_dir() else set()


# ---------------------------------------------------------------------------- run directories
# What a training run writes at the top of its output directory (besides hidden markers).
_RUN_FILES = {"checkpoints", "final", "metrics.jsonl", COMPLETE_NAME, "loss.png", "perplexity.png", "forgetting.png"}
_RUN_FILES |= {"compose", "wandb", "recipe.yaml", LOCK_NAME, RUN_MARKER}  # tensorboard, wandb: compose.trackers


def prepare_run_directory(directory: str | os.PathLike, *, resume: bool | str, overwrite: bool) -> None:
    """Refuse to start a fresh run over a previous one or over foreign files; then mark the directory.

    * foreign files (not written by a compose run) -> :class:`OutputError` unless ``overwrite``
      (they are then left alone);
    * a previous run (``final/``, ``metrics.jsonl`` or a completion marker) -> :class:`OutputError`
      unless ``resume`` (continue it) or ``overwrite`` (its metrics and completion marker are
      removed; its ``final/`` is replaced when the new run finishes).
    """
    directory = Path(directory)
    entries = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    ours = (directory / RUN_MARKER).is_file()
    foreign = sorted(n for n in entries if n not in _RUN_FILES and not n.startswith((".final.", ".checkpoints.")))
    if foreign and not ours and not overwrite:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise OutputError(
            f"output_dir {directory} already holds files compose did not write ({shown}); use a new or empty "
            "directory, or pass overwrite_output_dir=True to write the run beside them (they are left alone)"
        )
    previous = sorted(entries & {"final", "metrics.jsonl", COMPLETE_NAME})
    if previous and not resume and not overwrite:
        state = "a finished run" if COMPLETE_NAME in entries else "an unfinished run"
        raise OutputError(
            f"output_dir {directory} already holds {state} ({', '.join(previous)}); pass resume=True to continue "
            "it, overwrite_output_dir=True to start over (its metrics are cleared and final/ is replaced), "
            "or use a new output_dir"
        )
    if overwrite and not resume:
        for name in ("metrics.jsonl", COMPLETE_NAME):
            (directory / name).unlink(missing_ok=True)
    elif resume:
        (directory / COMPLETE_NAME).unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / RUN_MARKER, {"written_by": "compose", "started": _now()})


def mark_complete(directory: str | os.PathLike, info: dict[str, Any] | None = None) -> None:
    """Write the completion marker: the last file of a run."""
    write_json(Path(directory) / COMPLETE_NAME, {"complete": True, "finished": _now(), **(info or {})})


def is_complete(directory: str | os.PathLike) -> bool:
    return (Path(directory) / COMPLETE_NAME).is_file()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (a crash or a full disk leaves the old file or none, never half)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise naming ``path`` if it is not a whole safetensors file (cut short, damaged header).

    ``safetensors.safe_open`` reads only the header: its length, its JSON, and that the tensors'
    bytes cover the file exactly.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as e:
        if not any(cut in str(e).lower().replace(" ", "") for cut in _CUT_SHORT):
            raise ValueError(f"{path} has a damaged header: not a safetensors file, or corrupted") from None
        size = path.stat().st_size
        raise ValueError(
            f"{path} is cut short ({size} bytes): the file is incomplete (an interrupted copy or a full disk); "
            "save the model again"
        ) from None


# safetensors' errors for a file shorter than its header says (too short for a header, a header
# longer than the file, tensors beyond its end), as older ("HeaderTooSmall") and newer releases word them
_CUT_SHORT = ("headertoosmall", "invalidheaderlength", "incompletemetadata", "metadataincompletebuffer")
