"""Chat records: rendered with a chat template, loss on the assistant's turns, checked token by token."""

from __future__ import annotations

import json

import datasets
import pytest

from compose import chat
from compose.data import IGNORE, build_blocks, stream_blocks
from compose.testing import tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "be short"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def _no_markers(template: str) -> str:
    """The same template without ``{% generation %}``: the prefix path."""
    return template.replace("{% generation %}", "").replace("{% endgeneration %}", "")


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture
def chatml_tok():
    """The character tokenizer plus ChatML's two control tokens (ids 96, 97)."""
    t = tiny_tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return t


def _expected(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and labels, segment by segment (character tokenizer: segments tokenize on their own)."""
    ids, labels = [], []
    for text, trained in segments:
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [IGNORE] * len(part)
    return ids, labels


def _tiny_segments(eos: str = "</s>") -> list[tuple[str, bool]]:
    return [
        ("<s>### system:\nbe short\n### user:\nhi\n### assistant:\n", False),
        ("yo" + eos, True),
        ("\n### user:\n2+2?\n### assistant:\n", False),
        ("4" + eos, True),
    ]


@pytest.mark.parametrize("markers", [True, False], ids=["generation-markers", "prefix"])
def test_tiny_template_labels_token_by_token(tok, markers):
    template = chat.TEMPLATES["tiny"] if markers else _no_markers(chat.TEMPLATES["tiny"])
    assert chat.has_generation_markers(template) == markers
    got = chat.encode_chats(tok, template, [CONVERSATION])[0]
    assert got == _expected(tok, _tiny_segments())


@pytest.mark.parametrize("markers", [True, False], ids=["generation-markers", "prefix"])
def test_chatml_template_labels_token_by_token(chatml_tok, markers):
    template = chat.TEMPLATES["chatml"] if markers else _no_markers(chat.TEMPLATES["chatml"])
    ids, labels = chat.encode_chats(chatml_tok, template, [CONVERSATION])[0]
    # the markers cover the answer and <|im_end|>; by prefix, the turn's rendering also ends with its newline
    tail = "" if markers else "\n"
    want = _expected(
        chatml_tok,
        [
            ("<|im_start|>system\nbe short<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
            ("yo<|im_end|>" + tail, True),
            ("" if tail else "\n", False),
            ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
            ("4<|im_end|>" + tail, True),
            ("" if tail else "\n", False),
        ],
    )
    assert (ids, labels) == want
    assert 97 in [t for t in labels if t != IGNORE]  # <|im_end|> is one control token, and trained


def _records():
    second = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    return [{"messages": CONVERSATION}, {"messages": second}]


def _labels_of_blocks(blocks) -> list[int]:
    batch = blocks.batch(range(len(blocks)))
    keep = batch["attention_mask"].bool()
    return batch["labels"][keep].tolist()


def test_every_source_form_packs_the_same_blocks(tok, tmp_path):
    recs = _records()
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    opts = dict(seq_len=32, chat_template="tiny")
    from_list = build_blocks(recs, tok, **opts)
    from_file = build_blocks(str(path), tok, **opts)
    from_ds = build_blocks(datasets.Dataset.from_list(recs), tok, **opts)
    want = (
        _expected(tok, _tiny_segments())[1]
        + _expected(tok, [("<s>### user:\na\n### assistant:\n", False), ("b</s>", True)])[1]
    )
    for blocks in (from_list, from_file, from_ds):
        assert _labels_of_blocks(blocks) == want
    stream = stream_blocks(str(path), tok, **opts)
    rows = stream.take(len(from_list))
    assert rows["input_ids"].tolist() == from_list.input_ids.tolist()
    assert rows["labels"].tolist() == from_list.labels.tolist()


def test_chat_records_mix_with_text_records(tok):
    blocks = build_blocks([{"messages": CONVERSATION}, {"text": "plain"}], tok, 128, chat_template="tiny")
    labels = _labels_of_blocks(blocks)
    assert labels[-7:] == tok("plain")["input_ids"] + [2]  # text records keep every label (and EOS)


def test_mask_prompt_false_trains_on_the_whole_conversation(tok):
    blocks = build_blocks([{"messages": CONVERSATION}], tok, 128, chat_template="tiny", mask_prompt=False)
    batch = blocks.batch([0])
    keep = batch["attention_mask"].bool()
    assert batch["labels"][keep].tolist() == batch["input_ids"][keep].tolist()


def test_tokenizer_without_template_names_the_option(tok):
    with pytest.raises(ValueError, match=r"no chat template.*chat_template=.*chatml, tulu, tiny"):
        build_blocks(_records(), tok, 32)
    tok.chat_template = chat.TEMPLATES["tiny"]  # the tokenizer's own template is the default
    assert _labels_of_blocks(build_blocks(_records(), tok, 32))


def test_template_sources(tok, tmp_path):
    file = tmp_path / "t.jinja"
    file.write_text(chat.TEMPLATES["tulu"])
    assert chat.resolve_template(tok, str(file)) == chat.TEMPLATES["tulu"]
    assert chat.resolve_template(tok, "{{ messages }}") == "{{ messages }}"
    tok.chat_template = {"default": "A{{ 1 }}", "tool_use": "B{{ 1 }}"}
    assert chat.resolve_template(tok, None) == "A{{ 1 }}"
    assert chat.resolve_template(tok, "tool_use") == "B{{ 1 }}"
    with pytest.raises(ValueError, match=r"'nope' is not a template name \(chatml, tulu, tiny, default, tool_use\)"):
        chat.resolve_template(tok, "nope")
    with pytest.raises(FileNotFoundError, match="missing.jinja"):
        chat.check_template_option("missing.jinja")


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "'messages' must be a non-empty list"),
        ([{"content": "x"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user", "content": None}], r"messages\[0\] \(user\) has no text 'content'"),
    ],
)
def test_bad_messages_name_the_record(tok, messages, match):
    with pytest.raises(ValueError, match=rf"record 1: {match}"):
        build_blocks([{"messages": CONVERSATION}, {"messages": messages}], tok, 32, chat_template="tiny")


def test_conversation_opening_with_the_assistant(tok):
    messages = [{"role": "assistant", "content": "hey"}, {"role": "user", "content": "yo"}]
    for template in (chat.TEMPLATES["tiny"], _no_markers(chat.TEMPLATES["tiny"])):
        got = chat.encode_chats(tok, template, [messages])[0]
        assert got == _expected(tok, [("<s>### assistant:\n", False), ("hey</s>", True), ("\n### user:\nyo\n", False)])


def test_template_that_rewrites_earlier_turns_is_refused_on_the_prefix_path(tok):
    # renders only the last message's role in upper case: a prefix is not the start of the whole
    template = (
        "{% for m in messages %}{{ m['role'] | upper if loop.last else m['role'] }}:{{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(ValueError, match=r"record 0: .*\{% generation %\}"):
        chat.encode_chats(tok, template, [CONVERSATION])


def test_chat_prompt_ends_with_the_generation_prompt(tok):
    ids = chat.chat_prompt(tok, [{"role": "user", "content": "hi"}], "tiny")
    assert tok.decode(ids) == "<s>### user:\nhi\n### assistant:\n"
    assert chat.stop_token_ids(tok) == [2]


def test_tiny_chat_recipe_trains_and_generate_chat_replies(tmp_path, capsys, monkeypatch):
    """recipes/tiny/chat.yaml as shipped (2 steps a stage): the SFT stage reads chat records; generate --chat."""
    from pathlib import Path

    from compose import Composer
    from compose.cli import main

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    out = tmp_path / "run"
    overrides = [f"output.dir={out}", "train.max_steps=2", "stages.1.train.max_steps=2", "data.seq_len=32"]
    assert main(["train", "recipes/tiny/chat.yaml", *overrides]) == 0
    final = out / "instruct" / "final"
    saved = Composer.load(final).tokenizer
    assert saved.chat_template == chat.TEMPLATES["tiny"]  # the template the data was rendered with, kept
    capsys.readouterr()
    rc = main(["generate", str(final), "--chat", "--system", "be short", "--prompt", "What is 2+3?",
               "--max-new-tokens", "4"])  # fmt: skip
    assert rc == 0
    reply = capsys.readouterr().out
    assert "What is" not in reply and "###" not in reply[:3]  # the reply alone, not the rendered prompt
