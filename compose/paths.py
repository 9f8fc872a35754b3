"""One rule for "is this string a local path or a Hugging Face Hub id?" (models, tokenizers, datasets).

Hub ids are ``name`` or ``org/name``. A string is read as a local path when it starts with
``.``, ``/`` or ``~``, holds more than one ``/`` or the platform's own separator, or ends in a
data-file suffix (``.txt``, ``.jsonl``, ``.json``, ``.parquet``). A string that looks local but is
not on disk is a missing file, never a Hub download.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def looks_local(s: str) -> bool:
    """Whether ``s`` names a local path rather than a Hub id (the rule above).

    >>> looks_local("gpt2"), looks_local("org/model"), looks_local("./model"), looks_local("a/b/c")
    (False, False, True, True)
    >>> looks_local("code.jsonl"), looks_local("~/data")
    (True, True)
    """
    return (
        s.startswith((".", "/", "~"))
        or s.count("/") > 1
        or (os.sep != "/" and os.sep in s)
        or Path(s).suffix.lower() in DATA_FILE_SUFFIXES
    )
