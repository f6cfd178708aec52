"""artefacts.py: the one atomic write and the staged publish every script uses."""

import os

import pytest

import artefacts


def test_write_atomic_replaces_whole_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "sub" / "results.json"
    artefacts.write_atomic(str(path), '{"a": 1}')
    assert path.read_text() == '{"a": 1}'
    with pytest.raises(UnicodeEncodeError):
        artefacts.write_atomic(str(path), "\udcff cannot be UTF-8")  # fails while writing
    assert path.read_text() == '{"a": 1}' and os.listdir(path.parent) == ["results.json"]  # no temp file left
    artefacts.write_atomic(str(path), b"\x89PNG")
    assert path.read_bytes() == b"\x89PNG"


def test_publish_moves_the_marker_last_and_replaces_old_entries(tmp_path, monkeypatch):
    staging, out = tmp_path / ".incomplete", tmp_path / "out"
    (staging / "adapter").mkdir(parents=True)
    for name in (artefacts.TRAIN_RECORD, "model.safetensors", "adapter/a.bin"):
        (staging / name).write_text(name)
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "stale.bin").write_text("old")
    moved = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: moved.append(os.path.basename(b)) or replace(a, b))
    artefacts.publish(str(staging), str(out), last=artefacts.TRAIN_RECORD)
    assert moved[-1] == artefacts.TRAIN_RECORD and sorted(moved) == sorted(["adapter", "model.safetensors",
                                                                           artefacts.TRAIN_RECORD])
    assert sorted(os.listdir(out / "adapter")) == ["a.bin"] and not staging.exists()
