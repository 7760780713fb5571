import os

import pytest

from lacy_fast import fileio


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "stats.json"
    fileio.write_json(path, {"a": 1})
    fileio.write_json(path, {"a": 2})
    assert path.read_text().strip().endswith("}") and '"a": 2' in path.read_text()
    assert os.listdir(tmp_path) == ["stats.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "data.bin"
    fileio.write_bytes(path, b"old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_atomic_directory_replaces_whole(tmp_path):
    path = tmp_path / "ckpt"
    with fileio.atomic_path(path, is_dir=True) as tmp:
        (tmp / "a").write_text("1")
    with fileio.atomic_path(path, is_dir=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(path)) == ["b"]
    assert os.listdir(tmp_path) == ["ckpt"]
