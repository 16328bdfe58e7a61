"""Which runs of a DuckDB file are being written, and by which process.

A populate holds an advisory lock on its run from the moment it creates (or resumes) the run until
it ends: one byte, at offset run_id, of a file beside the warehouse (`.NAME.runs.lock`), locked
with POSIX record locks (`fcntl.lockf`). The kernel drops them when the process ends, however it
ends, so a killed populate never leaves its run locked. `runs --delete` and a second `--resume`
of the same run take the same lock without waiting and refuse, naming the writing process, when
another process has it: the writer releases the file between commits, so the DuckDB lock alone
would let a run be deleted under a populate that then goes on appending its batches.

Record locks belong to the process, and closing any descriptor of the file drops all of them, so
each process opens the lock file once and keeps it open.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from actwh.errors import WarehouseError

_FDS: dict[str, int] = {}  # lock file -> this process's one descriptor of it
_HELD: set[tuple[str, int]] = set()  # (lock file, run) this process has claimed
_FLOCK = "hhqqi4x"  # Linux's struct flock: type, whence, start, len, pid (padded to 32 bytes)


def lock_path(db: str | os.PathLike) -> Path:
    db = Path(db)
    return db.with_name(f".{db.name}.runs.lock")


def _key(db) -> str:
    return str(lock_path(db).resolve())


def _fd(db) -> int:
    if _key(db) not in _FDS:
        _FDS[_key(db)] = os.open(_key(db), os.O_RDWR | os.O_CREAT, 0o644)
    return _FDS[_key(db)]


def holder(db, run_id: int) -> int | None:
    """The pid of another process that holds run_id's lock (None: nobody, or not knowable)."""
    try:
        got = fcntl.fcntl(_fd(db), fcntl.F_GETLK,
                          struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, run_id, 1, 0))
        kind, _, _, _, pid = struct.unpack(_FLOCK, got)
    except (OSError, struct.error):
        return None
    return None if kind == fcntl.F_UNLCK else pid


def _lock(db, run_id: int, doing: str) -> None:
    try:
        fcntl.lockf(_fd(db), fcntl.LOCK_EX | fcntl.LOCK_NB, 1, run_id)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        pid = holder(db, run_id)
        who = f"process {pid}" if pid else "another process"
        raise WarehouseError(f"cannot {doing} run {run_id} of {db}: {who} is writing it (a populate "
                             "or its resume); wait for it to end, or stop it first") from None


def claim(db, run_id: int, doing: str) -> None:
    """Hold run_id's lock from now on, or raise a one-line WarehouseError naming its writer."""
    _lock(db, run_id, doing)
    _HELD.add((_key(db), run_id))


def release(db, run_id: int) -> None:
    if (_key(db), run_id) in _HELD:
        fcntl.lockf(_FDS[_key(db)], fcntl.LOCK_UN, 1, run_id)
        _HELD.discard((_key(db), run_id))


def check(db, run_id: int, doing: str) -> None:
    """Refuse now, in one line, if another process writes run_id; claim nothing."""
    if (_key(db), run_id) in _HELD:
        return
    _lock(db, run_id, doing)
    fcntl.lockf(_FDS[_key(db)], fcntl.LOCK_UN, 1, run_id)
