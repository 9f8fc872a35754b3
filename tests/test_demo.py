"""The demo's data generators, and `python -m compose.demo --quick` end to end."""

from __future__ import annotations

import json

import torch

from compose.tasks import ByteCodec, KVArithmetic, answer_accuracy, code_corpus, english_corpus, split_docs


def _ids_tail(task: KVArithmetic, rec: dict) -> tuple[list[int], int]:
    ids = rec["input_ids"]
    return ids[1 : rec["answer_pos"] - 1], ids[rec["answer_pos"]]


def test_kv_records_are_correct():
    task = KVArithmetic(num_keys=50, num_values=10, seed=3)
    assert len(task.train_keys) == 10 and len(task.heldout_keys) == 40
    assert not set(task.train_keys) & set(task.heldout_keys)
    for seed in range(6):  # every value has a training key: held-out keys hold no value never trained on
        t = KVArithmetic(num_keys=512, num_values=32, seed=seed)
        assert len(t.train_keys) == 102 and sorted(t.train_keys + t.heldout_keys) == list(range(512))
        assert {t.values[k] for k in t.train_keys} == set(t.values)
    for rec in task.records("kv_arith", 200, keys="heldout", seed=1):
        (a, op, b), ans = _ids_tail(task, rec)
        ka, kb = a - task.first_key_id, b - task.first_key_id
        assert ka in task.heldout_keys and kb in task.heldout_keys
        va, vb = task.values[ka], task.values[kb]
        assert ans == task.number(va + vb if op == 3 else va - vb)
        assert rec["labels"][-2:] == rec["input_ids"][-2:] and set(rec["labels"][:-2]) == {-100}
    for rec in task.records("kv_subst", 50, keys="train", seed=1):
        (k,), ans = _ids_tail(task, rec)
        assert ans == task.number(task.values[k - task.first_key_id])
    for rec in task.records("numeric", 200, seed=1):
        lhs, ans = _ids_tail(task, rec)
        nums = [t - task.number(0) for t in lhs]
        assert all(t < task.first_key_id for t in lhs)
        if len(lhs) == 1:
            assert ans == lhs[0]
        else:
            assert ans == task.number(nums[0] + nums[2] if lhs[1] == 3 else nums[0] - nums[2])
    assert task.records("kv_arith", 5, seed=7) == task.records("kv_arith", 5, seed=7)
    assert max(max(r["input_ids"]) for r in task.memory_records(20, keys="all")) < task.vocab_size


def test_memory_rows_and_blind_anchor():
    task = KVArithmetic(num_keys=30, num_values=6)
    for rec in task.memory_records(10, pairs=5):
        ids = rec["input_ids"]
        for k, v in zip(ids[1::2], ids[2::2]):
            assert v == task.number(task.values[k - task.first_key_id])
        assert [lab for lab in rec["labels"] if lab != -100] == ids[2::2]
    from compose.testing import tiny_model

    model = task.blind_to_keys_(tiny_model("llama", vocab=task.vocab_size))
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[task.key(0)], emb[task.key(29)])
    recs = task.records("kv_arith", 40, keys="heldout")
    assert 0.0 <= answer_accuracy(model, recs) <= 1.0


def test_unknown_key_rows_have_uniform_answers():
    """A key operand stands for a random value: for ``KEY + b`` every answer b ... b + V - 1 occurs,
    and nothing but key 0's token (the shared key embedding) appears."""
    task = KVArithmetic(num_keys=30, num_values=6, seed=1)
    recs = task.unknown_records(3000, seed=2)
    assert recs == task.unknown_records(3000, seed=2) and recs != task.unknown_records(3000, seed=3)
    answers: dict[int, set[int]] = {}
    shapes = set()
    for rec in recs:
        lhs, ans = _ids_tail(task, rec)
        assert rec["labels"][-2:] == rec["input_ids"][-2:] and set(rec["labels"][:-2]) == {-100}
        keys = [t for t in lhs if t >= task.first_key_id]
        assert keys and set(keys) == {task.key(0)}
        shapes.add(tuple(t >= task.first_key_id for t in lhs))
        value = ans - task.number(0)
        if len(lhs) == 1:
            assert 0 <= value < 6
        elif lhs[1] == 3 and lhs[2] < task.first_key_id:  # KEY + b: b ... b + 5, each seen
            answers.setdefault(lhs[2], set()).add(value)
    assert shapes == {(True,), (True, False, False), (False, False, True), (True, False, True)}
    for b_token, seen in answers.items():
        b = b_token - task.number(0)
        assert seen == set(range(b, b + 6))


def test_corpora_are_deterministic_and_disjoint():
    codec = ByteCodec()
    assert codec.decode(codec.encode("déjà vu")) == "déjà vu"
    english, code = english_corpus(20_000), code_corpus(20_000)
    assert english == english_corpus(20_000)
    assert sum(map(len, english)) >= 20_000 and sum(map(len, code)) >= 20_000
    assert not any('"""' in d for d in code)  # docstrings stripped
    train, held = split_docs(english, eval_every=3, max_eval_chars=500)
    assert sum(map(len, held)) <= 500 and len(train) + len(held) == len(english)


def test_code_split_keeps_modules_apart():
    from compose.demo.forgetting import split_code

    docs = [f"module{i} " * (20 + i) for i in range(60)]
    pre, adapt, held = split_code(docs, eval_chars=500, pretrain_chars=800)
    assert sum(map(len, held)) <= 500 and 700 < sum(map(len, pre)) <= 800
    names = [{d.split()[0] for d in part} for part in (pre, adapt, held)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert split_code(docs, eval_chars=500, pretrain_chars=0)[0] == []


def test_quick_demo_end_to_end(tmp_path):
    from compose.demo import main

    results = main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "forgetting.png").stat().st_size > 1000
    assert (tmp_path / "kv_arithmetic.png").stat().st_size > 1000
    methods = [r["method"] for r in saved["forgetting"]["rows"]]
    assert methods[0].startswith("pretrained") and "full" in methods
    assert any(m.startswith("block_expand") for m in methods)
    settings = {r["data"] for r in saved["forgetting"]["rows"][1:]}
    assert settings == {"code only", "code + 40% English replay"}
    tasks = {r["task"] for r in saved["kv_arithmetic"]["rows"]}
    assert {"KV-arithmetic", "KV-substitution", "numeric arithmetic"} <= tasks
    for row in saved["kv_arithmetic"]["rows"]:
        assert row["CALM min"] == row["CALM seed 0"] == row["CALM mean"]
    assert results["seconds"] > 0


def test_mix_operands_blends_only_operands_and_only_in_training():
    import pytest

    from compose.testing import tiny_model

    task = KVArithmetic(num_keys=20, num_values=8)
    model = tiny_model("llama", vocab=task.vocab_size)
    emb = model.get_input_embeddings()
    recs = task.records("numeric", 64, seed=0) + task.records("kv_arith", 16, keys="train", seed=0)
    ids = torch.tensor([r["input_ids"] + [0] * (7 - len(r["input_ids"])) for r in recs])
    plain = emb(ids).detach()
    handle = task.mix_operands(model, p=1.0, max_weight=0.4)
    try:
        model.train()
        torch.manual_seed(0)
        mixed = emb(ids).detach()
        moved = (mixed - plain).abs().amax(-1) > 0
        before_eq = (ids == 5).long().cumsum(1) == 0
        operand = (ids >= task.number(0)) & (ids <= task.number(task.num_values - 1)) & before_eq
        assert not moved[~operand].any()  # keys, operators, "=", the answer and padding untouched
        assert moved[operand].float().mean() > 0.9  # p=1: every operand blended (unless r == a or w ~ 0)
        # a blend stays closer to its own operand than to any other number
        table = emb.weight[task.number(0) : task.number(task.num_values - 1) + 1].detach()
        nearest = torch.cdist(mixed[operand], table).argmin(-1) + task.number(0)
        assert torch.equal(nearest, ids[operand])
        model.eval()
        assert torch.equal(emb(ids), plain)
    finally:
        handle.remove()
    model.train()
    assert torch.equal(emb(ids).detach(), plain)
    with pytest.raises(ValueError, match="max_weight"):
        task.mix_operands(model, p=0.5, max_weight=0.5)


def test_mix_operands_towards_the_key_embedding():
    import pytest

    from compose.testing import tiny_model

    task = KVArithmetic(num_keys=20, num_values=8)
    model = task.blind_to_keys_(tiny_model("llama", vocab=task.vocab_size))
    emb = model.get_input_embeddings()
    recs = [r for r in task.records("numeric", 64, seed=0) if len(r["input_ids"]) == 7]
    ids = torch.tensor([r["input_ids"] for r in recs])
    plain = emb(ids).detach()
    key = emb.weight[task.key(0)].detach()
    handle = task.mix_operands(model, p=0.0, key_p=1.0, key_max_weight=0.8)
    try:
        model.train()
        torch.manual_seed(0)
        mixed = emb(ids)
        moved = (mixed.detach() - plain).abs().amax(-1) > 0
        operand = (ids >= task.number(0)) & (ids <= task.number(task.num_values - 1)) & ((ids == 5).cumsum(1) == 0)
        assert not moved[~operand].any() and moved[operand].all()
        # each blend lies on the segment from the operand's embedding towards the key embedding, at most 0.8 of the way
        step = mixed.detach()[operand] - plain[operand]
        direction = key - plain[operand]
        w = (step * direction).sum(-1) / direction.pow(2).sum(-1)
        assert torch.allclose(step, w[:, None] * direction, atol=1e-6)
        assert 0 < float(w.min()) and float(w.max()) <= 0.8
        mixed.sum().backward()
        grad = emb.weight.grad
        assert float(grad[task.key(0) :].abs().max()) == 0.0  # the shared key embedding stays put
        assert float(grad[task.number(0)].abs().max()) > 0
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="key_max_weight"):
        task.mix_operands(model, key_p=0.5, key_max_weight=1.0)


def test_summary_line_reports_the_runs_own_seeds():
    from compose.demo.kv import summary_line

    rows = [
        {"task": "numeric arithmetic", "CALM seed 0": 99.0, "CALM seed 3": 98.0, "CALM min": 98.0, "CALM mean": 98.5},
        {"task": "KV-arithmetic", "CALM seed 0": 81.0, "CALM seed 3": 90.0, "CALM min": 81.0, "CALM mean": 85.5},
    ]
    line = summary_line(rows)
    assert line == (
        "CALM on held-out-key KV-arithmetic, 2 composition seed(s) (seed 0: 81.0%, seed 3: 90.0%): min 81.0%, mean 85.5%"
    )


def test_grid_table_goes_between_its_markers(tmp_path):
    import importlib.util
    from pathlib import Path

    import pytest

    spec = importlib.util.spec_from_file_location("kv_grid", Path(__file__).parents[1] / "bench" / "kv_grid.py")
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    row = {
        "seed": 0, "threads": 1, "calm_seed": 0, "m_A": 2.0, "m_B": 1.0, "m_B numeric": 99.0, "numeric": 98.0,
        "training keys": 96.0, "held-out": 85.0, "calm_cpu_seconds": 80.0,
    }  # fmt: skip
    bad = {**row, "seed": 1, "held-out": 30.0, "training keys": 40.0}
    doc = tmp_path / "results.md"
    doc.write_text("intro\n<!-- kv-grid:demo -->\nold table\n<!-- /kv-grid:demo -->\noutro\n")
    grid.write_markdown(doc, "demo", [row, bad])
    text = doc.read_text()
    assert text.startswith("intro\n<!-- kv-grid:demo -->\n| base seed") and text.endswith(
        "<!-- /kv-grid:demo -->\noutro\n"
    )
    assert "old table" not in text and "**85.0**" in text
    assert "2 runs: held-out min 30.0%, mean 57.5%" in text and "1 of 2 meet all of" in text
    with pytest.raises(SystemExit, match="kv-grid:paper"):
        grid.write_markdown(doc, "paper", [row])
