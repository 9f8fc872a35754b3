"""The real-model CALM experiments' drivers, end to end on tiny stand-in models (no downloads):
every stage runs, writes its result, is skipped when run again, and the frozen models are
checked after training."""

import json

import pytest

from compose.demo.common import OtherSettings
from compose.testing import tiny_model, tiny_tokenizer


def _folder(path, seed: int, layers: int):
    model = tiny_model("llama", seed=seed, layers=layers, positions=1024)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def folders(tmp_path):
    return _folder(tmp_path / "anchor", 0, 4), _folder(tmp_path / "augment", 1, 4)


def test_real_code_calm_driver_runs_resumes_and_checks_the_frozen_models(tmp_path, folders, monkeypatch):
    import compose.demo.real_code_calm as drv
    import compose.tasks.real as real

    anchor, augment = folders
    code = ["def f(x):\n    return x + 1\n" * 20] * 6
    english = ["In the beginning was the word. " * 20] * 4
    monkeypatch.setattr(drv, "prepare", lambda cfg, root=None: anchor)
    monkeypatch.setattr(real, "model_dir", lambda name, root=None: augment)
    data = {"code_train": code, "english_train": english, "code_test": code[:2], "english_test": english[:2]}
    monkeypatch.setattr(drv, "corpora", lambda cfg, root=None: data)
    cfg = drv.RealCodeCalmConfig(steps=2, seq_len=32, batch_size=2, every=2, problems=2, max_new_tokens=4)
    result = drv.run_real_code_calm(cfg, tmp_path / "run")
    assert [r["model"] for r in result["rows"]] == ["m_B", "m_A", "CALM", "m_B+LoRA"]
    assert result["frozen_models_unchanged"] is True
    assert json.loads((tmp_path / "run" / "CALM" / "frozen_unchanged.json").read_text()) is True
    assert (tmp_path / "run" / "real_code_calm.png").is_file()
    again = drv.run_real_code_calm(cfg, tmp_path / "run")  # every stage is skipped: same table
    assert again["rows"] == result["rows"] and again["frozen_models_unchanged"] is True
    with pytest.raises(OtherSettings, match=r"steps: 2 there, 3 now"):  # not the 2-step rows under 3 steps
        drv.run_real_code_calm(drv.RealCodeCalmConfig(**{**cfg.__dict__, "steps": 3}), tmp_path / "run")


def test_real_calm_driver_runs_all_stages(tmp_path, folders, monkeypatch):
    import compose.demo.real_calm as drv

    anchor, _ = folders
    books = ["Gen", "Exod", "Ruth", "Jonah", "Phil"]
    verses = [(b, f"mawu a {b} {i} ndi abwino", f"the word of {b} {i} is good") for b in books for i in range(12)]
    monkeypatch.setattr(drv, "prepare", lambda cfg, root=None: anchor)
    monkeypatch.setattr(drv, "parallel_verses", lambda root=None: verses)
    cfg = drv.RealCalmConfig(
        stage1_steps=2, steps=2, seq_len=32, batch_size=2, every=2, shots=1, test_pairs=2, max_new_tokens=4
    )
    result = drv.run_real_calm(cfg, tmp_path / "run")
    assert [r["model"] for r in result["rows"]] == ["m_B", "m_A", "CALM", "m_B+LoRA", "m_B fine-tuned"]
    assert result["frozen_models_unchanged"] is True and set(result["chichewa_bpb"]) == {"m_B", "m_A"}
    assert all(0 <= r["chrF"] <= 100 for r in result["rows"])
    assert (tmp_path / "run" / "real_calm.png").is_file()


def test_real_llama_pro_driver_adds_a_learning_rate_row_beside_the_defaults(tmp_path, folders, monkeypatch):
    import compose.demo.real as drv

    anchor, _ = folders
    code = ["def f(x):\n    return x + 1\n" * 20] * 6
    english = ["In the beginning was the word. " * 20] * 4
    data = {"code_train": code, "english_train": english, "code_test": code[:2], "english_test": english[:2]}
    monkeypatch.setattr(drv, "prepare", lambda cfg, root=None: anchor)
    monkeypatch.setattr(drv, "corpora", lambda cfg, root=None: data)
    cfg = drv.RealLlamaProConfig(steps=2, seq_len=32, batch_size=2, num_blocks=2, methods=("full", "interleave"))
    cfg.settings = ("code",)
    first = drv.run_real_llama_pro(cfg, tmp_path / "run")
    assert [r["method"] for r in first["rows"]] == ["full", "interleave"]
    faster = drv.RealLlamaProConfig(**{**cfg.__dict__, "methods": ("interleave",)})
    faster.lrs = {**cfg.lrs, "block_expand": 5e-4}
    second = drv.run_real_llama_pro(faster, tmp_path / "run")
    rows = {r["method"]: r for r in second["rows"]}
    assert list(rows) == ["full", "interleave", "interleave lr 0.0005"]
    assert rows["full"] == first["rows"][0] and rows["interleave"] == first["rows"][1]  # not run again
    assert rows["interleave lr 0.0005"]["code bpb"] != rows["interleave"]["code bpb"]  # trained at its own rate
    assert (tmp_path / "run" / "code" / "interleave_lr_0.0005" / "result.json").is_file()
    # another seed into the same directory would be reported with the seed-0 rows: refused before any work
    with pytest.raises(OtherSettings, match=r"seed: 0 there, 1 now.*another --out"):
        drv.run_real_llama_pro(drv.RealLlamaProConfig(**{**cfg.__dict__, "seed": 1}), tmp_path / "run")
    # the demo's --real keeps the CALM run in a subdirectory: not a row of this table
    other = tmp_path / "run" / "calm_chichewa" / "CALM"
    other.mkdir(parents=True)
    (other / "result.json").write_text(json.dumps({"model": "CALM", "chrF": 1.0}))
    assert drv.report(tmp_path / "run")["rows"] == second["rows"]


def test_bind_out_keeps_a_results_directory_to_one_set_of_settings(tmp_path):
    from dataclasses import dataclass

    from compose.demo.common import bind_out

    @dataclass
    class Cfg:
        steps: int = 2
        seed: int = 0
        methods: tuple = ("a",)
        threads: int | None = None

    bind_out(tmp_path / "out", Cfg())
    assert json.loads((tmp_path / "out" / "settings.json").read_text()) == {"steps": 2, "seed": 0, "methods": ["a"]}
    bind_out(tmp_path / "out", Cfg(threads=4))  # free by default
    bind_out(tmp_path / "out", Cfg(methods=("a", "b")), free=("methods", "threads"))
    with pytest.raises(OtherSettings) as e:
        bind_out(tmp_path / "out", Cfg(steps=3, seed=1, methods=("b",)))
    assert "methods: ['a'] there, ['b'] now; seed: 0 there, 1 now; steps: 2 there, 3 now" in str(e.value)


def test_spread_puts_seeds_side_by_side_each_against_its_own_full_run(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("rlp", Path(__file__).parents[1] / "bench" / "real_llama_pro.py")
    rlp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rlp)

    def folder(name, seed, rows):
        d = tmp_path / name
        for run, code, english in rows:
            (d / "code" / run).mkdir(parents=True)
            row = {"setting": "code", "method": run.split()[0], "run": run, "trainable": 1}
            row.update(code_bpb=code, english_bpb=english)
            (d / "code" / run / "result.json").write_text(json.dumps(row))
        (d / "base.json").write_text(json.dumps({"code_bpb": 1.0, "english_bpb": 2.0}))
        (d / "settings.json").write_text(json.dumps({"seed": seed, "steps": 30}))
        return str(d)

    a = folder("a", 0, [("full", 0.90, 1.9), ("interleave", 0.95, 2.0)])  # gain 10% and 5%: half of full's
    b = folder("b", 1, [("full", 0.80, 1.9), ("interleave", 0.95, 1.98)])  # 20% and 5%: a quarter
    lr = folder("lr", 0, [("interleave lr 0.0005", 0.93, 2.02)])  # no full run here: seed 0's from folder a
    out = rlp.spread([a, b, lr])
    share = {(r["run"], r["seed"]): r["of full FT gain %"] for r in out["rows"]}
    assert share[("full", 0)] == 100 and share[("interleave", 0)] == pytest.approx(50)
    assert share[("interleave", 1)] == pytest.approx(25) and share[("interleave lr 0.0005", 0)] == pytest.approx(70)
    inter = next(r for r in out["over_seeds"] if r["run"] == "interleave")
    assert inter["seeds"] == "0 1" and inter["of full FT gain % mean"] == pytest.approx(37.5)
    assert inter["of full FT gain % min"] == pytest.approx(25) and inter["English change % max"] == pytest.approx(0)
    assert "| interleave lr 0.0005 |" in capsys.readouterr().out
    (tmp_path / "a" / "settings.json").unlink()
    with pytest.raises(SystemExit, match="no settings.json"):
        rlp.spread([a])
