"""A crash between writing the temporary file and the rename leaves the old file whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sdxl_engine import files
from sdxl_engine.files import write_atomically


class Crash(Exception):
    pass


def test_failed_rename_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "lora_1.safetensors"
    target.write_bytes(b"old and complete")

    def crash(source, destination):
        assert Path(source).read_bytes() == b"new" * 1000  # the temporary is fully written
        raise Crash

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Crash):
        write_atomically(target, lambda tmp: tmp.write_bytes(b"new" * 1000))
    assert target.read_bytes() == b"old and complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora_1.safetensors"]


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "lora_2.safetensors"

    def half_then_crash(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise Crash

    with pytest.raises(Crash):
        write_atomically(target, half_then_crash)
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(files, "fsync_file", lambda path: events.append(("fsync", path.name)))
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda s, d: (events.append(("replace", Path(s).name)), real_replace(s, d))
    )
    write_atomically(tmp_path / "x.bin", lambda tmp: tmp.write_bytes(b"x"))
    assert events == [("fsync", "x.bin.tmp"), ("replace", "x.bin.tmp")]
