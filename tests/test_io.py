"""compose.io: atomic files and directories, ownership markers, run locks, run markers."""

from __future__ import annotations

import json
import os

import pytest

from compose import io as cio


def test_write_json_is_sorted_and_leaves_no_temporary(tmp_path):
    cio.write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.json").read_text().index('"a"') < (tmp_path / "a.json").read_text().index('"b"')
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_write_text_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="No space"):
        cio.write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_read_json_names_the_damaged_file(tmp_path):
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(ValueError, match=r"x.json is not valid JSON"):
        cio.read_json(tmp_path / "x.json")
    (tmp_path / "y.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"y.json is not UTF-8 text \(byte 7\)"):
        cio.read_json(tmp_path / "y.json")


def test_atomic_directory_marks_what_it_wrote(tmp_path):
    with cio.atomic_directory(tmp_path / "out") as d:
        (d / "w.bin").write_bytes(b"1")
    assert cio.owned_files(tmp_path / "out") == {"w.bin"}
    assert json.loads((tmp_path / "out" / cio.MARKER).read_text())["written_by"] == "compose"


def test_empty_or_missing_targets_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    cio.check_writable_target(tmp_path / "empty")
    cio.check_writable_target(tmp_path / "missing")


def test_foreign_target_needs_overwrite_and_keeps_foreign_files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "mine.txt").write_text("keep")
    with pytest.raises(cio.OutputError, match="mine.txt"):
        with cio.atomic_directory(d):
            pass
    with cio.atomic_directory(d, overwrite=True) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    assert (d / "mine.txt").read_text() == "keep" and cio.owned_files(d) == {"w.bin"}
    with cio.atomic_directory(d) as tmp:  # now compose's: no overwrite needed, foreign file still kept
        (tmp / "v.bin").write_bytes(b"2")
    assert (d / "mine.txt").read_text() == "keep" and not (d / "w.bin").exists()


def test_lock_is_released_and_a_second_holder_refused(tmp_path):
    with cio.output_lock(tmp_path) as lock:
        held = json.loads(lock.read_text())
        assert held["pid"] == os.getpid()
        with pytest.raises(cio.LockError, match=f"process {os.getpid()}"):
            with cio.output_lock(tmp_path):
                pass
    assert not (tmp_path / cio.LOCK_NAME).exists()


def test_run_directory_states(tmp_path):
    run = tmp_path / "run"
    cio.prepare_run_directory(run, resume=False, overwrite=False)
    assert (run / cio.RUN_MARKER).is_file()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(cio.OutputError, match="an unfinished run"):
        cio.prepare_run_directory(run, resume=False, overwrite=False)
    cio.mark_complete(run)
    assert cio.is_complete(run)
    with pytest.raises(cio.OutputError, match="a finished run"):
        cio.prepare_run_directory(run, resume=False, overwrite=False)
    cio.prepare_run_directory(run, resume=True, overwrite=False)
    assert not cio.is_complete(run) and (run / "metrics.jsonl").exists()
    cio.prepare_run_directory(run, resume=False, overwrite=True)
    assert not (run / "metrics.jsonl").exists()
