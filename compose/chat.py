"""Chat records: ``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered with a chat template.

A conversation is rendered with the tokenizer's chat template (or the one named by the
``chat_template`` option) and tokenized once; the loss is on the assistant's turns only.
Which tokens are the assistant's is decided in one of two ways:

* the template marks them with ``{% generation %} ... {% endgeneration %}`` (as TRL's and
  transformers' ``return_assistant_tokens_mask`` expect): the tokens overlapping the marked
  text are labelled;
* otherwise, by re-tokenizing prefixes: for each assistant turn ``i``, the conversation up to
  turn ``i`` with the generation prompt (where the answer starts) and up to and including
  turn ``i`` (where it ends) are rendered and tokenized; the tokens between the two lengths
  are labelled. Each rendered prefix must be a prefix of the whole conversation's text
  (templates that rewrite earlier turns, e.g. dropping past reasoning, are refused with
  advice); where a tokenizer merges characters across a boundary, the boundary is the
  longest common token prefix.

``chat_template`` is the name of a built-in template (:data:`TEMPLATES`), the name of one of
the tokenizer's own templates, a ``.jinja`` file, or the Jinja text itself.

>>> from compose.testing import tiny_tokenizer
>>> tok = tiny_tokenizer()
>>> ids, labels = encode_chats(tok, resolve_template(tok, "tiny"), [[
...     {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]])[0]
>>> tok.decode([t for t, l in zip(ids, labels) if l != -100])
'yo</s>'
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

__all__ = [
    "TEMPLATES",
    "resolve_template",
    "with_template",
    "has_generation_markers",
    "encode_chats",
    "chat_prompt",
    "stop_token_ids",
]

IGNORE = -100

TEMPLATES: dict[str, str] = {
    # ChatML (Qwen, many open chat models); the answer and its <|im_end|> are the assistant's tokens.
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Tulu / LLaMA-Pro-Instruct: <|user|>, <|assistant|> headers, each answer closed by EOS.
    "tulu": (
        "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
        "{% if not loop.last %}{{ '\n' }}{% endif %}{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    # Plain headers in printable ASCII: works with any tokenizer (the tiny character tokenizer included).
    "tiny": (
        "{{ bos_token }}{% for m in messages %}{{ '### ' + m['role'] + ':\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
        "{% if not loop.last %}{{ '\n' }}{% endif %}{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
    ),
}
"""Built-in templates, by name, for tokenizers that ship none (base models such as LLaMA-2)."""

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_OPTION_HELP = "pass chat_template= (a built-in name: " + ", ".join(TEMPLATES) + "; a .jinja file; or the Jinja text)"


def has_generation_markers(template: str) -> bool:
    """Whether ``template`` marks the assistant's text with ``{% generation %}``."""
    return bool(_GENERATION.search(template))


def resolve_template(tokenizer: Any, chat_template: str | None = None) -> str:
    """The Jinja text to render conversations with; a clear error when there is none."""
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if chat_template is None:
        if isinstance(own, dict):
            own = own.get("default")
        if not own:
            raise ValueError(f"the tokenizer has no chat template to render 'messages' records with; {_OPTION_HELP}")
        return own
    if not isinstance(chat_template, str) or not chat_template.strip():
        raise ValueError(f"chat_template must be a non-empty string, got {chat_template!r}; {_OPTION_HELP}")
    if chat_template in TEMPLATES:
        return TEMPLATES[chat_template]
    if isinstance(own, dict) and chat_template in own:
        return own[chat_template]
    if "{%" in chat_template or "{{" in chat_template:
        return chat_template
    path = Path(chat_template).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    names = list(TEMPLATES) + (sorted(own) if isinstance(own, dict) else [])
    raise ValueError(
        f"chat_template={chat_template!r} is not a template name ({', '.join(names)}), an existing .jinja file, "
        "or Jinja text"
    )


def with_template(tokenizer: Any, chat_template: str) -> Any:
    """A copy of ``tokenizer`` whose own chat template is ``chat_template`` (saved with it, used by generate)."""
    import copy

    template = resolve_template(tokenizer, chat_template)
    out = copy.deepcopy(tokenizer)
    out.chat_template = template
    return out


def check_template_option(chat_template: str | None) -> None:
    """What can be checked without a tokenizer: a path-like value must exist."""
    if chat_template is None or chat_template in TEMPLATES or "{%" in chat_template or "{{" in chat_template:
        return
    if chat_template.endswith((".jinja", ".j2", ".txt")) or os.sep in chat_template:
        if not Path(chat_template).expanduser().is_file():
            raise FileNotFoundError(f"chat_template file {chat_template!r} does not exist")


def _conversation(messages: Any, index: int) -> list[dict[str, Any]]:
    """One record's messages as plain dicts (None-valued keys dropped), checked."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError(f"record {index}: 'messages' must be a non-empty list of {{role, content}} mappings")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"record {index}: messages[{j}] has no 'role' (each message is {{role, content}})")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"record {index}: messages[{j}] ({m['role']}) has no text 'content'")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def encode_chats(
    tokenizer: Any, template: str, conversations: list[Any], where: list[int] | None = None
) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per conversation; labels are ``-100`` outside the assistant's turns."""
    where = list(where) if where is not None else list(range(len(conversations)))
    convs = [_conversation(c, i) for c, i in zip(conversations, where)]
    if not convs:
        return []
    if has_generation_markers(template) and getattr(tokenizer, "is_fast", False):
        return _by_markers(tokenizer, template, convs)
    return [_by_prefixes(tokenizer, template, c, i) for c, i in zip(convs, where)]


def _render(tokenizer: Any, template: str, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _by_markers(tokenizer: Any, template: str, convs: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    out = tokenizer.apply_chat_template(
        convs, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return [
        (list(ids), [t if m else IGNORE for t, m in zip(ids, mask)])
        for ids, mask in zip(out["input_ids"], out["assistant_masks"])
    ]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def _by_prefixes(tokenizer: Any, template: str, messages: list[dict], index: int) -> tuple[list[int], list[int]]:
    full = _render(tokenizer, template, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    bounds = []
    for i in turns:
        end = _render(tokenizer, template, messages[: i + 1])
        if i:
            start = _render(tokenizer, template, messages[:i], generation_prompt=True)
        else:  # the conversation opens with the assistant: its header is what an empty answer shares with it
            start = os.path.commonprefix([end, _render(tokenizer, template, [{**messages[0], "content": ""}])])
        for text in (start, end):
            if not full.startswith(text):
                raise ValueError(
                    f"record {index}: the chat template renders the conversation up to message {i} differently "
                    "from the start of the whole conversation, so the assistant's tokens cannot be found by "
                    "prefix; mark them with {% generation %} ... {% endgeneration %} in the template, or "
                    + _OPTION_HELP
                )
        bounds.append((start, end))
    texts = [full] + [t for pair in bounds for t in pair]
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids, labels = list(encoded[0]), [IGNORE] * len(encoded[0])
    for k in range(len(bounds)):
        lo = _common_prefix(ids, encoded[1 + 2 * k])
        hi = _common_prefix(ids, encoded[2 + 2 * k])
        labels[lo:hi] = ids[lo:hi]
    return ids, labels


def chat_prompt(tokenizer: Any, messages: list[dict], chat_template: str | None = None) -> list[int]:
    """Token ids of ``messages`` followed by the template's generation prompt (what a reply continues)."""
    template = resolve_template(tokenizer, chat_template)
    text = _render(tokenizer, template, _conversation(messages, 0), generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and the common end-of-turn tokens the tokenizer has as single tokens."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in _END_OF_TURN if t in vocab and vocab[t] not in ids]
    return ids
