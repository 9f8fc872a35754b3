"""Two corpora every Python install carries: English prose and Python code.

Both come from the running interpreter's standard library, so the demo needs no
download and no data directory:

* :func:`english_corpus`: the docstrings of the standard library's modules, classes and
  functions, filtered to prose paragraphs (doctest lines and tables dropped);
* :func:`code_corpus`: the same modules' code, with docstrings removed and comments
  dropped (``ast.unparse``), so that the two corpora do not overlap.

Files are visited in sorted order and nothing is random, so a given Python version
always yields the same text. Tests, IDLE, demos and installed packages are skipped.
:class:`ByteCodec` turns text into byte-level ``input_ids`` records (vocab 259: pad,
bos, eos, 256 bytes), which :meth:`compose.Composer.fit` takes without a tokenizer.

>>> from compose.tasks import ByteCodec
>>> codec = ByteCodec()
>>> codec.decode(codec.encode("héllo")) == "héllo"
True
"""

from __future__ import annotations

import ast
import inspect
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ByteCodec", "english_corpus", "code_corpus", "split_docs", "stdlib_files"]

_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "__pycache__",
    "config-3",
}


class ByteCodec:
    """Byte-level ids: 0 pad, 1 bos, 2 eos, then byte ``b`` is id ``b + 3``."""

    pad_id, bos_id, eos_id, offset = 0, 1, 2, 3
    vocab_size = 259

    def encode(self, text: str, *, bos: bool = True, eos: bool = True) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")

    def records(self, docs: list[str]) -> list[dict[str, list[int]]]:
        """``[{"input_ids": ...}, ...]``, one per document, ready for ``Composer.fit``."""
        return [{"input_ids": self.encode(d)} for d in docs]


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files in sorted order, tests and tools left out."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in _SKIP_DIRS or p.startswith(("config-", "test_")) for p in rel):
            continue
        out.append(path)
    if not out:
        raise FileNotFoundError(f"no Python files under {root}: is the standard library installed?")
    return out


def _parsed(root: str | Path | None) -> Iterator[tuple[Path, ast.Module]]:
    for path in stdlib_files(root):
        try:
            with tokenize.open(path) as f:
                source = f.read()
            yield path, ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue


def _is_prose(par: str) -> bool:
    if len(par) < 60 or par.lstrip().startswith((">>>", "...", "$", "|", "+-", "==", "--")):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in par)
    return letters / len(par) > 0.85


def english_corpus(max_chars: int = 2_000_000, root: str | Path | None = None) -> list[str]:
    """Prose paragraphs of the standard library's docstrings, one document per module.

    ``root`` overrides where the standard library is looked for (tests use a small tree).
    """
    docs, total = [], 0
    for _, tree in _parsed(root):
        pars = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    for par in inspect.cleandoc(doc).split("\n\n"):
                        par = " ".join(par.split())
                        if _is_prose(par):
                            pars.append(par)
        if pars:
            doc = "\n".join(pars)
            docs.append(doc)
            total += len(doc)
            if total >= max_chars:
                break
    return docs


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


def code_corpus(max_chars: int = 2_000_000, root: str | Path | None = None) -> list[str]:
    """The standard library's modules as code only (no docstrings, no comments), one document each."""
    docs, total = [], 0
    for _, tree in _parsed(root):
        try:
            code = ast.unparse(_strip_docstrings(tree))
        except (ValueError, RecursionError):
            continue
        if len(code) < 200:
            continue
        docs.append(code)
        total += len(code)
        if total >= max_chars:
            break
    return docs


def split_docs(docs: list[str], eval_every: int = 10, max_eval_chars: int | None = None) -> tuple[list, list]:
    """Deterministic train / held-out split: every ``eval_every``-th document is held out.

    With ``max_eval_chars``, held-out documents stop once that many characters are
    held out (the last one is cut to fit); the rest go to training.
    """
    train, held = [], []
    held_chars = 0
    for i, d in enumerate(docs):
        if i % eval_every == eval_every - 1 and (max_eval_chars is None or held_chars < max_eval_chars):
            if max_eval_chars is not None:
                d = d[: max_eval_chars - held_chars]
            held.append(d)
            held_chars += len(d)
        else:
            train.append(d)
    return train, held
