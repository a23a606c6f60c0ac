"""A run's folder (`output_dir`): one run at a time, what a killed run left, set-aside branches, and metrics.jsonl.

    output_dir/
      .lock            exists while a run holds the folder; names it (pid, host, start)
      config.yaml      the run's resolved configuration
      metrics.jsonl    one JSON line per step (and per evaluation)
      checkpoint-STEP/ see checkpointing.py
      final/           the student when the run ended
      abandoned-N/     what an explicit resume from an earlier checkpoint set aside: the later checkpoints, final/ and
                       the metric lines past the resumed step, kept, under names `latest` never picks
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ..atomic import is_disk_full, leftovers, remove, write_text_atomically

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
METRICS_NAME = "metrics.jsonl"
ABANDONED_PREFIX = "abandoned-"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"  # written last into a checkpoint's staging folder
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class RunFolderInUseError(OSError):
    """Another process holds the run folder; nothing was written."""


class DiskFullError(OSError):
    """The disk filled up while the run wrote to its folder; the message names the last good checkpoint."""


class RunLock:
    """An exclusive hold on a run folder, from before a run writes anything until it ends.

    It is an `fcntl.flock` on `output_dir/.lock`, which the kernel releases when the holder exits however it dies:
    a killed run never blocks the next one, and no timeout or pid guessing is involved. The file's content only names
    the holder, for the message a second run prints. (filelock, which huggingface_hub uses, takes the same flock but
    keeps its descriptor private, and its 3.x versions open the file truncated: the holder's name would need a second
    file.) On platforms without `fcntl` the folder is not locked.

    Args:
        folder: The run folder (created if missing).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._file: BinaryIO | None = None  # a file object: a trainer dropped without cleanup() lets go when collected
        self._created = False

    def acquire(self) -> RunLock:
        """Take the folder, or raise `RunFolderInUseError` naming the process that holds it."""
        try:
            import fcntl
        except ImportError:
            logger.warning(f"this platform has no fcntl: {self.folder} is not protected from a second run.")
            return self
        self._created = not self.folder.exists()
        while True:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                file = open(self.path, "a+b")  # created if missing, never truncated: its content names the holder
            except FileNotFoundError:  # the folder was just removed by a holder that created it and let it go
                continue
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(file.fileno())
                file.close()
                raise RunFolderInUseError(
                    f"{self.folder} is in use by another run ({holder}): wait for it to end, or give another "
                    "output_dir (nothing was written)."
                ) from None
            # The holder before us deletes the file as it lets go: if that happened between our open and our lock,
            # we hold a deleted file, so open the path again.
            try:
                if os.stat(self.path).st_ino == os.fstat(file.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            file.close()
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now().isoformat(timespec="seconds")}
        file.truncate(0)
        file.write(json.dumps(holder).encode())
        file.flush()
        self._file = file
        return self

    def release(self) -> None:
        """Let the folder go (nothing if not held); a folder the lock created and nothing else used is removed."""
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)  # first: whoever opens the path next gets a new file
        self._file.close()  # closing the last descriptor releases the flock
        self._file = None
        if self._created and not any(self.folder.iterdir()):
            self.folder.rmdir()


def _read_holder(descriptor: int) -> str:
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def list_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints (`checkpoint-STEP` with a `trainer_state.json`) in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _CHECKPOINT_NAME.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(_CHECKPOINT_NAME.match(path.name)[1])


def last_good_checkpoint(folder: Path) -> str:
    """`"the last good checkpoint is ..."`, for the messages of a run that stops."""
    checkpoints = list_checkpoints(folder)
    return f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"


@contextmanager
def writing_into(folder: Path, what: str) -> Iterator[None]:
    """Turn a full disk while writing `what` into the run folder into one line naming the last good checkpoint."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise DiskFullError(
            f"the disk of {folder} is full: {what} could not be written (nothing of it was kept) and "
            f"{last_good_checkpoint(folder)}. Free some space, then resume with resume_from_checkpoint=latest."
        ) from error


def hold_run_folder(accelerator, folder: Path) -> RunLock:
    """The main process takes `folder`'s `RunLock` and removes what a killed run left there; if it cannot, every
    process raises its `RunFolderInUseError`."""
    from accelerate.utils import broadcast_object_list

    lock, refusal = RunLock(folder), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except RunFolderInUseError as error:
            refusal = str(error)
    refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise RunFolderInUseError(refusal)
    if accelerator.is_main_process:
        clean_leftovers(folder)
    return lock


def start_run_folder(folder: Path, resumed_step: int | None) -> Path | None:
    """Bring the folder to the state the run starts from (main process, under the lock); returns the set-aside folder.

    A fresh run drops the metric lines of an earlier run that left no checkpoint (it redoes those steps). A resumed
    run drops the lines past its checkpoint, and when the folder holds later checkpoints (an explicit resume from an
    earlier one), moves them, `final/` and those lines into `abandoned-N/` (see `set_aside`).

    Args:
        folder: The run folder.
        resumed_step: The step of the checkpoint the run resumes from, or `None` for a fresh run.
    """
    metrics, step = folder / METRICS_NAME, -1 if resumed_step is None else resumed_step
    kept, after = [], []
    for line in read_metrics(metrics):
        (kept if json.loads(line)["step"] <= step else after).append(line)
    aside = None
    later = [p for p in reversed(list_checkpoints(folder)) if checkpoint_step(p) > step]  # newest first
    if later:
        final = [folder / "final"] if (folder / "final").exists() else []
        aside = set_aside(folder, [*later, *final], after)
    text = "".join(line + "\n" for line in kept)
    if metrics.is_file() and metrics.read_text(encoding="utf-8", errors="replace") != text:
        if resumed_step is None:
            logger.warning(f"dropped the metric lines of an earlier run in {folder} that left no checkpoint.")
        write_text_atomically(metrics, text)  # a kill meanwhile leaves the whole old file
    return aside


def clean_leftovers(folder: Path) -> list[Path]:
    """Delete the staging and set-aside copies (`.NAME.*.partial`, `.NAME.*.old`) that a killed run left in `folder`.

    Call it only while holding the folder's `RunLock`: then no writer of them can still be running.
    """
    found = leftovers(folder)
    for path in found:
        remove(path)
    if found:
        logger.warning(f"removed what a killed run left half-written in {folder}: {', '.join(p.name for p in found)}")
    return found


def set_aside(folder: Path, paths: list[Path], metric_lines: list[str]) -> Path:
    """Move `paths` (checkpoints, `final/`) and `metric_lines` into a new `folder/abandoned-N/`; returns it.

    The newest checkpoint goes first: a kill midway leaves the older ones of the abandoned branch in place, which are
    still whole checkpoints of one consistent run.
    """
    number = 1
    while (folder / f"{ABANDONED_PREFIX}{number}").exists():
        number += 1
    target = folder / f"{ABANDONED_PREFIX}{number}"
    target.mkdir()
    if metric_lines:
        write_text_atomically(target / METRICS_NAME, "".join(line + "\n" for line in metric_lines))
    for path in paths:
        os.rename(path, target / path.name)
    return target


def read_metrics(path: Path) -> list[str]:
    """The complete lines of a metrics file; a torn last line (a kill or a full disk mid-write) is dropped.

    Raises:
        ValueError: A line before the last does not parse: the file was damaged otherwise, and is left as it is.
    """
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except ValueError:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is not JSON: the file is damaged; repair or remove that "
                                 "line, then resume (nothing was changed).") from None
            logger.warning(f"dropped the torn last line of {path} (an interrupted write): {line[:80]!r}")
            return lines[:-1]
    return lines


def append_metrics(path: Path, record: dict) -> None:
    """Append one line to the metrics file (a kill mid-write leaves a torn last line, which `read_metrics` drops)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
