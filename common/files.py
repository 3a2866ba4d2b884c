"""Writing files so that a crash never leaves half of one: `atomic_write`, used by every writer of the project.

A file (or a whole folder, e.g. a training checkpoint) is written under a hidden temporary name beside its
final path, fsync'd, and renamed into place with `os.replace`, which is atomic on POSIX file systems: a
reader sees the old version or the new one, never a mixture. On an error the temporary is removed and the
old version stays. Temporaries are created with the process's umask (not mkstemp's 0600), so what lands
has the permissions the user expects. A process killed with SIGKILL can leave a temporary
(`.NAME.tmp-PID`); `remove_stale_temporaries` clears them.
"""

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path, write: Callable[[Path], object], *, folder: bool = False, replace: bool = True) -> Path:
    """Create `path` through a temporary: `write(tmp)` fills a file (or, with `folder`, an existing empty
    folder), everything is fsync'd, then it is renamed into place and the parent folder fsync'd.

    An existing `path` is replaced (a folder: moved aside, replaced, then deleted), unless `replace` is
    False: then a `path` that appeared meanwhile (another process built the same thing) is kept and ours
    dropped. Any exception, KeyboardInterrupt included, removes the temporary and propagates."""
    path = Path(path)
    tmp = temporary_name(path)
    _remove(tmp)  # left by a killed process of the same pid
    try:
        if folder:
            tmp.mkdir()
        write(tmp)
        for f in (sorted(tmp.rglob("*")) if folder else [tmp]):
            if f.is_file():
                _fsync(f)
        if path.exists() and not replace:  # another process made it meanwhile: keep theirs
            _remove(tmp)
            return path
        if folder and path.exists():  # a folder cannot be renamed onto a non-empty one: swap
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            _remove(old)
        else:
            try:
                os.replace(tmp, path)
            except OSError:
                if replace or not path.exists():
                    raise
                _remove(tmp)  # lost the race to another process: keep theirs
                return path
        _fsync(path.parent)
    except BaseException:
        _remove(tmp)
        raise
    return path


def write_text(path, text: str) -> Path:
    """`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def remove_stale_temporaries(folder, name_glob: str = "*") -> None:
    """Delete the `.NAME.tmp-*` / `.NAME.old-*` temporaries under `folder` that killed processes left behind
    (call before writing there)."""
    for pattern in (f".{name_glob}.tmp-*", f".{name_glob}.old-*"):
        for stale in Path(folder).glob(pattern):
            _remove(stale)
