"""One run per output folder: an OS file lock on FOLDER/.lock, taken before a run reads, clears or writes anything
there and held until it ends.

Two trainings (or two generate_images.py runs) started on one folder would interleave their checkpoints, metrics
and images. So a run first takes `fcntl.flock(LOCK_EX | LOCK_NB)` on FOLDER/.lock and writes into it who holds it
(pid, host, start time, command). A second run finds the lock taken, reads the holder from the file and stops
with one line naming it (`FolderInUse`, exit status 2), having written nothing (the file exists: opening it
creates nothing).

The kernel releases a flock when the last descriptor of it closes, however the process ends (kill -9 included), so
a lock file left by a killed run does not block: it is taken over. A forked child (a data-loader worker) shares
the descriptor and keeps the lock until it exits too; when the recorded holder on this host has ended, a taker
waits a few seconds for such children before giving up. A run that ends removes the lock file while it still
holds it (a taker checks that the file it locked is still the one at the path, and tries again otherwise), then
the folders it created, if nothing else was put in them.

Under torchrun only rank 0 takes the lock (`lock_run_folder`); the other ranks wait for its answer, as for the
other start-up checks. flock works on local file systems and on NFS (Linux maps it to NFS byte-range locks).
"""

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from common.errors import FolderInUse, WriteError

LOCK_NAME = ".lock"
ORPHAN_WAIT_S = 10.0  # how long a lock of an ended holder may stay with its children (data-loader workers)
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # file systems without flock


class FolderLock:
    """A held lock on FOLDER/.lock; `release()` (idempotent) removes it and the folders made for it."""

    def __init__(self, path: Path, fd: int | None, made: list[Path]):
        self.path, self.fd, self.made = path, fd, made

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)  # still holding it: no taker is between its open and its flock
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        for folder in self.made:  # deepest first; only where nothing was written
            try:
                folder.rmdir()
            except OSError:
                break
        self.made = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def take_lock(folder, flag: str) -> FolderLock:
    """Lock `folder` (created if missing) for this process, or raise FolderInUse naming the run that holds it
    (`flag`: the option that named the folder, for the message). A file system without locks: a warning, and
    an unlocked FolderLock."""
    folder = Path(folder).absolute()
    made = [p for p in [folder, *folder.parents] if not p.exists()]
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        deadline = None
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = read_holder(path)
                if _ended(holder):  # its forked children may still hold it for a moment
                    deadline = deadline or time.monotonic() + ORPHAN_WAIT_S
                    if time.monotonic() < deadline:
                        time.sleep(0.1)
                        continue
                raise FolderInUse(in_use_message(folder, flag, holder)) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in UNSUPPORTED:
                    raise
                print(f"warning: cannot lock {path} ({e.strerror}): this file system has no file locks, so nothing "
                      "stops a second run from writing into this folder at the same time", file=sys.stderr)
                return FolderLock(path, None, [])
            if _same_file(path, fd):
                break
            os.close(fd)  # its holder removed it as it ended: lock the file now at the path
        record = json.dumps(holder_info(), ensure_ascii=False) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode("utf-8"), 0)
    except OSError as e:
        raise WriteError(f"cannot lock {path}: {e.strerror or e}", e.strerror or str(e)) from e
    return FolderLock(path, fd, made)


def lock_run_folder(folder, flag: str, world) -> FolderLock | None:
    """`take_lock` on rank 0 of `world` (common.runtime.World); every rank gets its answer: FolderInUse (or
    WriteError) on all of them, else rank 0's lock (None on the others)."""
    lock, problem = None, None
    if world.main:
        try:
            lock = take_lock(folder, flag)
        except (FolderInUse, WriteError) as e:
            problem = (type(e).__name__, str(e))
    problem = world.broadcast(problem)
    if problem is not None:
        raise (FolderInUse if problem[0] == "FolderInUse" else WriteError)(problem[1])
    return lock


def holder_info() -> dict:
    """What the lock file says about this process."""
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started,
            "command": shlex.join([Path(sys.executable).name, *sys.argv])}


def read_holder(path: Path, tries: int = 20) -> dict | None:
    """The holder recorded in a lock file; a holder that has just taken it may not have written it yet."""
    for _ in range(tries):
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(info, dict) and "pid" in info:
                return info
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    return None


def in_use_message(folder: Path, flag: str, holder: dict | None) -> str:
    if holder is None:
        who = f"its lock file {folder / LOCK_NAME} does not say which"
    else:
        command = " ".join(str(holder.get("command", "?")).split())
        command = command if len(command) <= 300 else command[:297] + "..."
        who = (f"pid {holder.get('pid')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}: "
               f"{command}")
    return (f"--{flag} {folder} is in use by another run ({who}); wait for it to end or stop it, or give another "
            f"--{flag}")


def _ended(holder: dict | None) -> bool:
    """The recorded holder ran on this host and is gone."""
    if not holder or holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        return False
    return False


def _same_file(path: Path, fd: int) -> bool:
    try:
        now, locked = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino)
