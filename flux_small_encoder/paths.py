"""What a path is: a kind of file by its suffix, a regular file or something else, a name that stays in its folder.

One place for the rules that resolving names (`registry`), reading (`checkpoint`, `training`), writing (`convert`) and
the messages about them share.
"""

from __future__ import annotations

import os
import stat

# Pickled files (`torch.save`, the reference trainer's `.pth`, accelerate's `.pkl`): the package reads state dicts of
# tensors from them only through `pickled`, never with full unpickling, and writes none.
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")
# A name ending so is a checkpoint file, never a registry name or a Hub repo id.
CHECKPOINT_FILE_SUFFIXES = (".safetensors", ".json", *PICKLE_SUFFIXES)


def not_a_regular_file(path: str | os.PathLike) -> str | None:
    """What `path` is when it is no regular file, following symlinks (`"missing"`, `"a named pipe (FIFO)"`,
    `"a character device (a symlink to /dev/zero)"`, ...), for a message; `None` for a regular file.

    Reading a pipe or a device as a file would block or never end, so callers check before they open.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"a symlink to {os.readlink(path)}, which does not exist" if os.path.islink(path) else "missing"
    except OSError as error:
        return f"unreadable ({error.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = {
        stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket",
    }
    kind = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
    return f"{kind} (a symlink to {os.readlink(path)})" if os.path.islink(path) else kind


def is_plain_name(name: object) -> bool:
    """Whether `name` names a file of its own folder: not a path (`../x`, `/etc/passwd`, `a/b`), `.` or `..`.

    A folder's index (a sharded model's, the teacher cache's) may name only such files: nothing outside is followed.
    """
    return isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name
