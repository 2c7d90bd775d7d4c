"""Files the daemon writes that hold a user's data: private (0600, directories 0700) unless asked otherwise.

Embeddings, vocabularies and results are the user's: on a shared host another user must not read
them (the shared-memory segments are 0600 for the same reason). Every such file is created here, with
its mode set explicitly (the umask cannot widen or narrow it), written to a temporary name and renamed,
so it is never half-written and never readable by others, not even while being written.
"""
from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def parse_mode(text: str) -> int:
    """An octal file mode from the command line (e.g. 0644 or 644); argparse type, one-line error."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode like 0600 or 0644") from None
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600 or mode & 0o133:
        raise argparse.ArgumentTypeError(f"mode {text} must let the owner read and write (0600 at least) and "
                                         "give nobody execute or others write (e.g. 0600, 0640, 0644)")
    return mode


def dir_mode_for(file_mode: int) -> int:
    """The directory mode that goes with `file_mode`: searchable where readable, the owner's always rwx."""
    mode = PRIVATE_DIR_MODE
    for read, search in ((stat.S_IRGRP, stat.S_IXGRP), (stat.S_IROTH, stat.S_IXOTH)):
        if file_mode & read:
            mode |= read | search
    return mode


def make_dirs(path: Path, mode: int = PRIVATE_DIR_MODE) -> Path:
    """`path` and its missing parents, each created with `mode` (existing ones are left as they are)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode)
        except FileExistsError:  # created meanwhile by another writer: fine
            continue
        os.chmod(d, mode)  # mkdir's mode is masked by the umask
    return path


def open_for_append(path: Path, mode: int = PRIVATE_FILE_MODE) -> int:
    """A descriptor appending to `path` (created with `mode`; an existing file of ours is set to `mode`)."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | _NOFOLLOW, mode)
    try:
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) != mode and st.st_uid == os.geteuid():
            os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_atomic(path: Path, data: bytes | memoryview, mode: int = PRIVATE_FILE_MODE, *, fsync: bool = True,
                 tmp: Path | None = None) -> None:
    """Write `data` to a temporary file beside `path` (`tmp`, default `path`.tmp; created with `mode`),
    then rename it over `path`."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)  # a stale one of a killed writer: O_EXCL below must not trip on it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # exactly `mode`, whatever the umask
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A full disk must not also leave half-written copies (150 MB snapshots) behind.
        tmp.unlink(missing_ok=True)
        raise
