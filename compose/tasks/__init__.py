"""Synthetic and found-on-the-machine tasks for demos, benchmarks and tests.

* :mod:`compose.tasks.kv_arithmetic`: CALM's key-value arithmetic (Bansal et al., 2024,
  Table 1), with one token per key and per number, so no tokenizer is needed.
* :mod:`compose.tasks.corpora`: a general English corpus and a Python code corpus
  found in the running interpreter's standard library, for the LLaMA Pro forgetting
  experiment; byte-level, deterministic, offline.
"""

from .corpora import ByteCodec, code_corpus, english_corpus, split_docs
from .kv_arithmetic import KVArithmetic, answer_accuracy, memory_accuracy

__all__ = [
    "ByteCodec",
    "KVArithmetic",
    "answer_accuracy",
    "code_corpus",
    "english_corpus",
    "memory_accuracy",
    "split_docs",
]
