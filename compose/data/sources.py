"""Data sources -> ``datasets.Dataset`` records: datasets, lists, local files and folders, hub names."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..paths import looks_local

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _looks_like_path(s: str) -> bool:
    return looks_local(s)  # hub names are "name" or "org/name"; see compose.paths


def check_cache_dir(cache_dir: str | os.PathLike | None) -> str | None:
    """Raise a clear error when ``cache_dir`` (or datasets' default cache) cannot be written."""
    import datasets

    target = Path(cache_dir).expanduser() if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE)
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target):
            pass
    except OSError as e:
        option = "data_cache_dir" if cache_dir is not None else "data_cache_dir (or HF_DATASETS_CACHE)"
        raise PermissionError(
            f"the data cache directory {str(target)!r} is not writable ({e.strerror or e}); "
            f"set {option} to a writable directory"
        ) from e
    return str(target) if cache_dir is not None else None


def check_num_proc(num_proc: Any) -> int | None:
    if num_proc is None:
        return None
    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc <= 0:
        raise ValueError(f"num_proc must be a positive integer or None, got {num_proc!r}")
    return num_proc


def _from_list(items: Sequence[Any], text_field: str):
    import datasets

    if all(isinstance(x, str) for x in items):
        return datasets.Dataset.from_dict({text_field: list(items)})
    if all(isinstance(x, dict) for x in items):
        keys: dict[str, None] = {}
        for rec in items:
            keys.update(dict.fromkeys(rec))
        return datasets.Dataset.from_dict({k: [rec.get(k) for rec in items] for k in keys})
    raise TypeError("a data list must hold only strings or only dicts")


def load_records(
    source: Any, *, split: str = "train", text_field: str = "text", cache_dir: str | None = None, streaming=False
):
    """Turn a data source into a ``datasets.Dataset`` (``IterableDataset`` when ``streaming``)."""
    import datasets

    if isinstance(source, datasets.DatasetDict | datasets.IterableDatasetDict):
        if split not in source:
            raise ValueError(f"the DatasetDict has no split {split!r}; splits: {', '.join(source)}")
        source = source[split]
    if isinstance(source, datasets.IterableDataset):
        if not streaming:
            raise TypeError("an IterableDataset can only be streamed: pass streaming=True")
        return source
    if isinstance(source, datasets.Dataset):
        return source.to_iterable_dataset() if streaming else source
    if isinstance(source, str | os.PathLike):
        return _load_path(source, split, text_field, cache_dir, streaming)
    if isinstance(source, list | tuple):
        ds = _from_list(source, text_field)
        return ds.to_iterable_dataset() if streaming else ds
    raise TypeError(
        f"unsupported data source of type {type(source).__name__}; give a datasets.Dataset, a list of strings "
        "or dicts, a .txt/.jsonl/.parquet path, or a hub dataset name"
    )


def _load_path(source, split: str, text_field: str, cache_dir: str | None, streaming: bool):
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path, text_field, cache_dir, streaming)
    if path.is_dir() or glob.has_magic(str(source)):
        return _read_files(_list_files(path, str(source)), text_field, cache_dir, streaming)
    if isinstance(source, os.PathLike) or _looks_like_path(str(source)):
        raise FileNotFoundError(f"data file {str(source)!r} does not exist")
    try:
        return datasets.load_dataset(str(source), split=split, cache_dir=cache_dir, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"could not load {source!r} as a local file or a hub dataset ({type(e).__name__}: {e})") from e


def _read_file(path: Path, text_field: str, cache_dir: str | None, streaming: bool):
    import datasets

    suffix = path.suffix.lower()
    if suffix not in _BUILDERS:
        raise ValueError(f"unsupported data file type {suffix!r} ({path}); use .txt, .jsonl, .json or .parquet")
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if suffix == ".txt" else {}
    try:
        ds = datasets.load_dataset(
            _BUILDERS[suffix], data_files=str(path), split="train", cache_dir=cache_dir, streaming=streaming, **kwargs
        )
    except Exception as e:  # noqa: BLE001 - located and re-raised below
        raise _explain_file_error(path, e) from e
    if suffix == ".txt":
        if text_field != "text":
            ds = ds.rename_column("text", text_field)
        ds = ds.filter(_NonBlank(text_field))
    return ds


def _list_files(path: Path, source: str) -> list[Path]:
    """The files of a directory (recursively, hidden ones skipped) or of a glob pattern, sorted."""
    if path.is_dir():
        files = [
            p for p in path.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts)
        ]
    else:
        files = [Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file()]
    if not files:
        raise FileNotFoundError(
            f"{source!r} matches no files; give a directory of text files or a glob such as 'src/**/*.py'"
        )
    return sorted(files)


def _read_files(files: list[Path], text_field: str, cache_dir: str | None, streaming: bool):
    """Several files: JSON Lines / Parquet files are read as records; any other files are text, one document each.

    One file = one document is how code corpora are fed (a module's blank lines do not split it).
    """
    import datasets

    suffixes = {p.suffix.lower() for p in files}
    for kind in ("json", "parquet"):
        if suffixes <= {s for s, b in _BUILDERS.items() if b == kind}:
            builder, kwargs = kind, {}
            break
    else:
        builder, kwargs = "text", {"sample_by": "document"}
    try:
        ds = datasets.load_dataset(
            builder,
            data_files=[str(p) for p in files],
            split="train",
            cache_dir=cache_dir,
            streaming=streaming,
            **kwargs,
        )
    except Exception as e:  # noqa: BLE001 - located and re-raised below
        bad = next((p for p in files if not _is_utf8(p)), None) if builder == "text" else None
        raise (
            _explain_file_error(bad, e)
            if bad is not None
            else ValueError(f"could not read {len(files)} files as {builder} ({type(e).__name__}: {e})")
        ) from e
    if builder == "text":
        if text_field != "text":
            ds = ds.rename_column("text", text_field)
        ds = ds.filter(_NonBlank(text_field))
    return ds


def _is_utf8(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            while f.read(1 << 20):
                pass
        return True
    except UnicodeDecodeError:
        return False


class _NonBlank:
    def __init__(self, field: str):
        self.field = field

    def __call__(self, record: dict) -> bool:
        return bool(record[self.field].strip())


def _explain_file_error(path: Path, error: Exception) -> Exception:
    """Name the file (and for JSON Lines the line) that ``datasets`` could not read."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        if isinstance(cause, UnicodeDecodeError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, UnicodeDecodeError):
        return ValueError(f"{path}: not UTF-8 text ({cause.reason} at byte {cause.start}); re-encode it as UTF-8")
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.read(1)
            f.seek(0)
            lines = [] if first == "[" else f
            for lineno, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})")
    from ..validation import check_data_file

    try:  # empty, a line that is not a JSON object, a text that is not a string: named with its line
        check_data_file(path)
    except ValueError as e:
        return e
    return ValueError(f"could not read {path} ({type(error).__name__}: {error})")
