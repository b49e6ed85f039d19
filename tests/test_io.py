"""srkernels._io.atomic_write: the one write-temp / fsync / publish step of save_pretrained and the toolkit."""
import os
import subprocess
import sys

import pytest

import srkernels._io
from srkernels._io import TEMP_NAME, atomic_write, remove_stale_temp_files, temp_path


def _temps(d):
    return [p for p in d.iterdir() if TEMP_NAME.fullmatch(p.name)]


def test_writes_bytes_and_writer_output(tmp_path):
    a = atomic_write(tmp_path / "sub" / "a.bin", b"hello")  # the parent folder is created
    assert a.read_bytes() == b"hello"
    b = atomic_write(tmp_path / "b.bin", lambda f: f.write(b"x" * 10))
    assert b.read_bytes() == b"x" * 10
    assert _temps(tmp_path) == [] and _temps(tmp_path / "sub") == []


def test_no_partial_file_at_the_final_path(tmp_path):
    dst = tmp_path / "w.pt"
    dst.write_bytes(b"old")
    seen = []

    def writer(f):
        f.write(b"new, first half")
        f.flush()
        seen.append(dst.read_bytes())  # mid-write a reader still finds the old file
        temps = _temps(tmp_path)
        seen.append(temps)
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(dst, writer)
    assert seen[0] == b"old"
    # the temp file was beside the target, named .<name>.<pid>.<hex>.tmp, and is gone after the failure
    (tmp,) = seen[1]
    m = TEMP_NAME.fullmatch(tmp.name)
    assert m["name"] == "w.pt" and int(m["pid"]) == os.getpid()
    assert dst.read_bytes() == b"old" and _temps(tmp_path) == []


def test_temp_name_keeps_the_suffix(tmp_path):
    p = temp_path(tmp_path / "img.png", ".png")
    assert p.parent == tmp_path and p.name.startswith(".img.png.") and p.name.endswith(".tmp.png")
    assert TEMP_NAME.fullmatch(p.name)
    names = []
    atomic_write(tmp_path / "img.png", lambda f: names.extend(q.name for q in _temps(tmp_path)), suffix=".png")
    assert len(names) == 1 and names[0].endswith(".tmp.png") and TEMP_NAME.fullmatch(names[0])


def test_refuses_overwrite_when_asked(tmp_path):
    dst = tmp_path / "model.safetensors"
    dst.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        atomic_write(dst, b"new", overwrite=False)
    assert dst.read_bytes() == b"keep me" and _temps(tmp_path) == []
    atomic_write(dst, b"new", overwrite=True)
    assert dst.read_bytes() == b"new"


def test_refuses_a_target_that_appears_during_the_write(tmp_path):
    dst = tmp_path / "out.png"

    def writer(f):
        f.write(b"ours")
        dst.write_bytes(b"theirs")  # another process published first

    with pytest.raises(FileExistsError):
        atomic_write(dst, writer, overwrite=False)
    assert dst.read_bytes() == b"theirs" and _temps(tmp_path) == []


def test_overwrite_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="overwrite"):
        atomic_write(tmp_path / "a", b"", overwrite="no")


def test_stale_temp_of_a_killed_writer_is_removed(tmp_path):
    # a writer killed with SIGKILL in the middle of atomic_write leaves its temp file; a later call removes it
    # (_io imports nothing of srkernels: load the file alone, without importing torch)
    code = ("import importlib.util as u, os, signal, sys\n"
            "s = u.spec_from_file_location('_io', sys.argv[2]); io = u.module_from_spec(s); s.loader.exec_module(io)\n"
            "def w(f):\n    f.write(b'partial'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
            "io.atomic_write(sys.argv[1], w)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "k.pt"), srkernels._io.__file__])
    assert r.returncode == -9
    left = _temps(tmp_path)
    assert len(left) == 1 and not (tmp_path / "k.pt").exists()
    live = temp_path(tmp_path / "live.pt")  # this process is alive: kept
    live.write_bytes(b"")
    other = tmp_path / ".x.tmp"  # not ours: kept
    other.write_bytes(b"")
    assert remove_stale_temp_files(tmp_path) == left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
