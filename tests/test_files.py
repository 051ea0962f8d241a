"""files.write_bytes_atomically: the old file survives a failed write; no temporaries are left."""

import os
import stat

import pytest

from ddpm_jax import files


def test_write_creates_directories_and_the_content(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"
    files.write_bytes_atomically(str(path), b"{}\n")
    assert path.read_bytes() == b"{}\n"
    assert os.listdir(path.parent) == ["out.json"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "samples.npz"
    files.write_bytes_atomically(str(path), b"good")
    with pytest.raises(TypeError):
        files.write_bytes_atomically(str(path), "not bytes")  # fails inside the write
    assert path.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["samples.npz"]


def test_new_files_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "grid.png"
        files.write_bytes_atomically(str(path), b"png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_remote_paths_are_recognised():
    assert files.is_remote("gs://bucket/run/eval/x.json")
    assert not files.is_remote("/tmp/run/eval/x.json")
