"""A run's folder (`output_dir`): one run at a time, what a killed run left, lineages, set-aside branches, metrics.

    output_dir/
      .lock            exists while a run holds the folder; names it (pid, host, start)
      config.yaml      the run's resolved configuration
      metrics.jsonl    one JSON line per step (and per evaluation), each naming the session that wrote it
      checkpoint-STEP/ see checkpointing.py
      final/           the student when the run ended
      abandoned-N/     what a resume set aside because it is not in the resumed checkpoint's history: checkpoints of
                       another branch, final/ and their metric lines, kept, under names `latest` never picks

Each start of the trainer, fresh or resuming, is a *session* with a random id. A checkpoint records its lineage: the
sessions that led to it, each with the step it started from (`new_session`). So a resume knows which checkpoints and
metric lines are its history (`session_spans`), wherever the checkpoint it continues comes from.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from ..atomic import is_disk_full, leftovers, remove, write_text_atomically
from .files import DamagedFileError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
FINAL_NAME = "final"
ABANDONED_PREFIX = "abandoned-"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"  # written last into a checkpoint's staging folder
ANY_SESSION = "*"  # the history of a checkpoint without a lineage (see `session_spans`)
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
        self._file = file
        try:
            file.truncate(0)
            file.write(json.dumps(holder).encode())
            file.flush()
        except BaseException:  # a full disk: let the folder go as it was
            self.release()
            raise
        return self

    def release(self) -> None:
        """Let the folder go (nothing if not held); a folder the lock created and nothing else used is removed."""
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)  # first: whoever opens the path next gets a new file
        with suppress(OSError):  # what is left to flush of the holder's name may not fit a full disk
            self._file.close()  # closing the last descriptor releases the flock
        self._file = None
        if self._created:
            # A new holder may take the folder from here on (its .lock makes it non-empty): then it stays.
            with suppress(OSError):
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


def checkpoint_step(path: Path) -> int | None:
    """The step in a `checkpoint-STEP` folder's name; `None` for another name."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match[1]) if match else None


def last_good_checkpoint(folder: Path) -> str:
    """`"the last good checkpoint is ..."`, for the messages of a run that stops."""
    checkpoints = list_checkpoints(folder)
    return f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"


def how_to_go_on(folder: Path, first: str | None = None) -> str:
    """The end of the message of a run that stopped: its last good checkpoint and how to resume from it, or, when it
    wrote none, how to start it again. `first` is what to do before (`"Free some space"`)."""
    checkpoints = list_checkpoints(folder)
    if checkpoints:
        config = Path(folder) / CONFIG_NAME
        command = (f" (`flux-small-encoder train --config {config} resume_from_checkpoint=latest`)"
                   if config.is_file() else "")
        resume = f"{first}, then resume" if first else "Resume"
        return f"the last good checkpoint is {checkpoints[-1]}. {resume} with resume_from_checkpoint=latest{command}."
    left = earlier_run(folder)
    again = (f"start the run again with a new output_dir, or after moving {', '.join(left)} out of {folder}"
             if left else "start the run again")
    return (f"no checkpoint was written yet, so there is nothing to resume. "
            f"{f'{first}, then {again}' if first else again[0].upper() + again[1:]}.")


@contextmanager
def writing_into(folder: Path, what: str, then: str | None = None) -> Iterator[None]:
    """Turn a full disk while writing `what` into `folder` into one line: what could not be written, and `then`, what
    to do (default: for a run folder, its last good checkpoint and how to go on, see `how_to_go_on`)."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise DiskFullError(f"the disk of {folder} is full: {what} could not be written (nothing of it was kept) and "
                            f"{then or how_to_go_on(folder, 'Free some space')}") from error


def hold_run_folder(accelerator, folder: Path) -> RunLock:
    """The main process takes `folder`'s `RunLock` and removes what a killed run left there; if it cannot (another
    run holds it, the disk is full), every process raises its error."""
    from accelerate.utils import broadcast_object_list

    lock, refusal = RunLock(folder), None
    if accelerator.is_main_process:
        try:
            with writing_into(folder, f"its lock file {LOCK_NAME}"):
                lock.acquire()
        except (RunFolderInUseError, DiskFullError) as error:
            refusal = error
    refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise refusal
    if accelerator.is_main_process:
        clean_leftovers(folder)
    return lock


def earlier_run(folder: Path) -> list[str]:
    """The names of what an earlier run left in `folder` (checkpoints, `final/`, `metrics.jsonl`, `config.yaml`)."""
    names = [path.name for path in list_checkpoints(folder)]
    return names + [name for name in (FINAL_NAME, METRICS_NAME, CONFIG_NAME) if (Path(folder) / name).exists()]


def new_session(lineage: list[dict], step: int) -> list[dict]:
    """`lineage` followed by a new session that starts from `step` (0 for a fresh run), under a new random id."""
    return [*lineage, {"session": secrets.token_hex(6), "from_step": step}]


def session_spans(lineage: list[dict], step: int) -> dict[str, tuple[int, int]]:
    """The history of the checkpoint at `step` with `lineage`, as `{session id: (first step, last step)}`.

    A checkpoint or a metric line is in that history when its session's span holds its step. A checkpoint written
    before lineages were recorded has none: its history is every step up to its own, whichever session wrote it.
    """
    if not lineage:
        return {ANY_SESSION: (0, step)}
    ends = [entry["from_step"] for entry in lineage[1:]] + [step]
    return {entry["session"]: (entry["from_step"], end) for entry, end in zip(lineage, ends, strict=True)}


def checkpoint_lineage(path: Path) -> list[dict]:
    """The lineage in a checkpoint's `trainer_state.json` (none if unreadable, malformed, or written before lineages
    were)."""
    try:
        return read_trainer_state(path)["lineage"]
    except (OSError, ValueError):
        return []


def read_trainer_state(checkpoint: Path) -> dict:
    """A checkpoint's `trainer_state.json`, checked: an object whose `step` is a whole number, not negative, and the
    folder's own (`checkpoint-STEP`), with a well-formed `lineage` and `resumes` (both may be absent: earlier
    versions).

    Raises:
        DamagedFileError: One line naming the file and what is wrong with it.
    """
    path = Path(checkpoint) / STATE_NAME
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise DamagedFileError(f"{path} is not JSON ({error}): the checkpoint {checkpoint} cannot be resumed."
                               ) from None
    problem = None
    if not isinstance(state, dict):
        problem = f"a JSON {type(state).__name__}, not an object"
    elif not _is_count(state.get("step")):
        problem = f"its step {state.get('step')!r} is not a whole number of at least 0"
    elif checkpoint_step(path.parent) not in (None, state["step"]):
        problem = f"its step {state['step']} is not the step of its folder, {path.parent.name}"
    elif not _is_lineage(state.setdefault("lineage", [])) or not isinstance(state.setdefault("resumes", []), list):
        problem = "its lineage or resumes are not lists as the trainer writes them"
    if problem:
        raise DamagedFileError(f"{path} is damaged ({problem}): the checkpoint {checkpoint} cannot be resumed.")
    return state


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_lineage(lineage) -> bool:
    return isinstance(lineage, list) and all(
        isinstance(entry, dict) and isinstance(entry.get("session"), str) and _is_count(entry.get("from_step"))
        for entry in lineage
    )


def start_run_folder(folder: Path, resumed: Path, step: int, lineage: list[dict]) -> Path | None:
    """Bring the folder to the history of the checkpoint a run resumes from (main process, under the lock); returns
    the `abandoned-N/` folder it set aside, if any.

    The checkpoints and metric lines of that history stay (by its `lineage`, see `session_spans`). Every other
    checkpoint (the later ones after an explicit resume from an earlier checkpoint; all of them for a checkpoint of
    another run or from `abandoned-N/`), `final/` and the metric lines outside the history go together into
    `abandoned-N/` (see `set_aside`). If no checkpoint goes, the lines outside the history are those a killed session
    wrote past its last checkpoint, and are dropped: those steps are trained again. A checkpoint from another folder
    brings the metric lines of its history from that folder's `metrics.jsonl`.

    Args:
        folder: The run folder.
        resumed: The checkpoint the run resumes from.
        step: Its step.
        lineage: Its lineage (see `checkpoint_lineage`).
    """
    spans, metrics, source = session_spans(lineage, step), folder / METRICS_NAME, Path(resumed).parent
    history, other_lines = _history_lines(metrics, spans)
    elsewhere = source.resolve() != folder.resolve()
    if elsewhere:
        history = {**_history_lines(source / METRICS_NAME, spans)[0], **history}
    other_checkpoints = [path for path in reversed(list_checkpoints(folder))  # newest first
                         if path.resolve() != Path(resumed).resolve() and not _checkpoint_in_history(path, spans)]
    final = [folder / FINAL_NAME] if (folder / FINAL_NAME).exists() else []
    aside = None
    if other_checkpoints or (elsewhere and final):
        aside = set_aside(folder, [*other_checkpoints, *final], other_lines)
    text = "".join(history[key] + "\n" for key in sorted(history, key=lambda key: key[1]))
    if (metrics.is_file() or text) and _read_text(metrics) != text:
        write_text_atomically(metrics, text)  # a kill meanwhile leaves the whole old file
    return aside


def _history_lines(path: Path, spans: dict[str, tuple[int, int]]) -> tuple[dict[tuple[str, int], str], list[str]]:
    """The lines of a metrics file in the history `spans`, by session and step, and the other lines."""
    history, other = {}, []
    for line in read_metrics(path):
        record = json.loads(line)
        if _in_history(spans, record.get("session"), record["step"]):
            history[record.get("session"), record["step"]] = line
        else:
            other.append(line)
    return history, other


def _checkpoint_in_history(checkpoint: Path, spans: dict[str, tuple[int, int]]) -> bool:
    lineage = checkpoint_lineage(checkpoint)
    return _in_history(spans, lineage[-1]["session"] if lineage else None, checkpoint_step(checkpoint))


def _in_history(spans: dict[str, tuple[int, int]], session: str | None, step: int) -> bool:
    first, last = spans.get(session, spans.get(ANY_SESSION, (1, 0)))
    return first <= step <= last


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None


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
        DamagedFileError: A line before the last does not parse, or a line is not an object with a whole `step`:
            the file was damaged otherwise, and is left as it is.
    """
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number < len(lines):
                raise DamagedFileError(f"{path} line {number} is not JSON: the file is damaged; repair or remove that "
                                 "line, then resume (nothing was changed).") from None
            logger.warning(f"dropped the torn last line of {path} (an interrupted write): {line[:80]!r}")
            return lines[:-1]
        if not (isinstance(record, dict) and _is_count(record.get("step"))
                and isinstance(record.get("session", ""), str)):
            raise DamagedFileError(f"{path} line {number} is not a metrics record (an object with a whole `step`): "
                                   "the file is damaged; repair or remove that line, then resume (nothing was "
                                   "changed).")
    return lines


def append_metrics(folder: Path, record: dict) -> None:
    """Append one line to `folder/metrics.jsonl` (a kill mid-write leaves a torn last line, which `read_metrics`
    drops; a full disk raises `DiskFullError`)."""
    with writing_into(folder, f"{METRICS_NAME} at step {record['step']}"):
        with open(Path(folder) / METRICS_NAME, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
