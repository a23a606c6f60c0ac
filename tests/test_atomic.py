"""`flux_small_encoder.atomic`: a file that appears meanwhile is never replaced, what libraries write is readable like
any file the user creates, and what a killed writer left is cleaned up by the next writer of the same target."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flux_small_encoder import atomic
from flux_small_encoder.atomic import atomic_file, atomic_folder, leftovers, write_text_atomically

KILLED = 9


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped) on this machine."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def killed_while_writing(write) -> None:
    """Run `write(staging)` inside an atomic writer in a forked child that dies before the block ends."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            write()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == KILLED, "the child did not reach its kill point"


def _die(*args, **kwargs):
    os._exit(KILLED)


def test_a_file_that_appears_just_before_the_rename_is_kept(tmp_path, monkeypatch):
    target = tmp_path / "image.png"

    def another_writer_first(original):
        def rename(source, destination, *args, **kwargs):
            if Path(destination) == target:  # someone else's file lands after every check, just before the rename
                target.write_bytes(b"the other writer's")
            return original(source, destination, *args, **kwargs)

        return rename

    for name in ("link", "rename", "replace"):
        monkeypatch.setattr(os, name, another_writer_first(getattr(os, name)))
    with pytest.raises(FileExistsError, match="appeared while it was being written: nothing was replaced"):
        write_text_atomically(target, "ours", overwrite=False)
    assert target.read_bytes() == b"the other writer's"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["image.png"]  # no staging copy left either


def test_without_overwrite_a_new_file_is_written_and_no_staging_name_remains(tmp_path):
    write_text_atomically(tmp_path / "a.txt", "text", overwrite=False)
    assert [path.name for path in tmp_path.iterdir()] == ["a.txt"] and (tmp_path / "a.txt").read_text() == "text"


def test_files_libraries_write_get_the_permissions_open_gives(umask_022, tmp_path):
    tensors = {"weight": torch.zeros(2)}
    with atomic_file(tmp_path / "model.safetensors") as staging:
        save_file(tensors, staging)  # safetensors creates its files 0600
    with atomic_folder(tmp_path / "encoder") as staging:
        save_file(tensors, staging / "model.safetensors")
        (staging / "config.json").write_text("{}")
        inner = Path(tempfile.mkdtemp(dir=staging))  # 0700
        save_file(tensors, inner / "shard.safetensors")
    assert mode(tmp_path / "model.safetensors") == 0o644
    encoder = tmp_path / "encoder"
    assert {path.name: mode(path) for path in encoder.rglob("*")} == {
        "model.safetensors": 0o644, "config.json": 0o644, inner.name: 0o755, "shard.safetensors": 0o644,
    }
    assert mode(encoder) == 0o755


def test_a_file_keeps_the_umask_of_its_writer(tmp_path):
    previous = os.umask(0o077)
    try:
        with atomic_file(tmp_path / "private.safetensors") as staging:
            save_file({"weight": torch.zeros(2)}, staging)
    finally:
        os.umask(previous)
    assert mode(tmp_path / "private.safetensors") == 0o600


@pytest.mark.parametrize("writer", ["file", "folder"])
def test_what_a_killed_writer_left_is_removed_by_the_next_writer_of_the_target(writer, tmp_path, monkeypatch):
    target = tmp_path / ("model.safetensors" if writer == "file" else "encoder")

    def write(then=None):
        if writer == "file":
            with atomic_file(target) as staging:
                staging.write_bytes(b"x" * 1000)
                (then or (lambda: None))()
        else:
            with atomic_folder(target, replace=True) as staging:
                (staging / "model.safetensors").write_bytes(b"x" * 1000)
                (then or (lambda: None))()

    killed_while_writing(lambda: write(then=_die))
    left = leftovers(tmp_path, target.name, stale_only=True)
    assert len(left) == 1 and all(path.name.endswith(".partial") for path in left)
    others = [
        tmp_path / f".{target.name}.{os.getpid()}-{atomic._host_id()}-0123abcd.partial",  # a live writer's
        tmp_path / f".{target.name}.{dead_pid()}-0badf00d-0123abcd.partial",  # another machine's: its pid says nothing
        tmp_path / f".other.bin.{dead_pid()}-{atomic._host_id()}-0123abcd.partial",  # another target's
    ]
    for path in others:
        path.write_bytes(b"")
    write()
    assert not any(path.exists() for path in left)
    assert all(path.exists() for path in others)
    assert target.exists()


def test_a_stale_set_aside_copy_is_kept_while_its_target_is_absent(tmp_path):
    # Killed between moving the old folder aside and renaming the new one in: the `.old` is the only complete copy.
    aside = tmp_path / f".encoder.{dead_pid()}-{atomic._host_id()}-0123abcd.old"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    with atomic_folder(tmp_path / "encoder") as staging:
        (staging / "config.json").write_text("{}")
    assert aside.exists()
    with atomic_folder(tmp_path / "encoder", replace=True):  # once the target exists, the old copy is garbage
        pass
    assert not aside.exists()


def test_leftover_names_of_earlier_versions_are_still_recognised(tmp_path):
    names = [".a.txt.0123abcd.partial", f".b.txt.{dead_pid()}-0123abcd.partial", f".c.{os.getpid()}-0123abcd.old"]
    for name in names:
        (tmp_path / name).write_text("")
    assert [path.name for path in leftovers(tmp_path, stale_only=True)] == names[:2]


def test_a_cause_chain_that_loops_ends(tmp_path):
    import threading

    first, second = ValueError("first"), OSError("second")
    first.__context__, second.__cause__ = second, first  # re-raised while handling its own consequence
    answers = []
    reader = threading.Thread(target=lambda: answers.append(atomic.is_disk_full(first)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert answers == [False], "is_disk_full went round the chain forever"
