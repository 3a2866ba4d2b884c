"""Writing files so that a crash never leaves half of one: `atomic_write`, used by every writer of the project.

A file (or a whole folder, e.g. a training checkpoint) is written under a hidden temporary name beside its
final path, fsync'd, and renamed into place with `os.replace`, which is atomic on POSIX file systems: a
reader sees the old version or the new one, never a mixture. On an error the temporary is removed and the
old version stays. What lands gets the permissions the user's umask gives (0644 / 0755 under umask 022),
whatever mode the writer created it with (safetensors creates 0600). A process killed with SIGKILL can
leave a temporary (`.NAME.tmp-PID`); `remove_stale_temporaries` clears them.

A writer that fails for lack of space or permission (OSError, and torch.save's and safetensors' own
RuntimeError / SafetensorError, e.g. "unexpected pos" or "No space left on device") becomes a `WriteError`
naming the path: one line for the scripts to print before they exit with status 2. `check_writable` tests
an output folder before any model is loaded.
"""

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from common.cli import fail
from common.errors import WriteError

WRITE_FAILURES = (OSError, RuntimeError, SafetensorError)  # torch.save and safetensors raise their own types


def reason_of(error: BaseException) -> str:
    """Why a write failed, in a few words: 'No space left on device' for an OSError, for safetensors' '... I/O
    error: ... (os error 28)' and for torch.save's '... unexpected pos ...'; else the message's first line."""
    if isinstance(error, WriteError):
        return error.reason
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    if code := re.search(r"\(os error (\d+)\)", text):
        return os.strerror(int(code.group(1)))
    if "unexpected pos" in text:  # torch's zip writer wrote less than it asked for
        return "the file could not be written in full (is the disk full?)"
    return text.splitlines()[0] if text else type(error).__name__


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def _share(tmp: Path, folder: bool) -> None:
    """Give what was written the modes a plain `open` / `mkdir` would (0666 / 0777 less the umask)."""
    mask = umask()
    for f in [tmp, *(tmp.rglob("*") if folder else [])]:
        if not f.is_symlink():
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path, write: Callable[[Path], object], *, folder: bool = False, replace: bool = True) -> Path:
    """Create `path` through a temporary: `write(tmp)` fills a file (or, with `folder`, an existing empty
    folder), everything is fsync'd, then it is renamed into place and the parent folder fsync'd.

    An existing `path` is replaced (a folder: moved aside, replaced, then deleted), unless `replace` is
    False: then a `path` that appeared meanwhile (another process built the same thing) is kept and ours
    dropped. Any exception, KeyboardInterrupt included, removes the temporary and propagates; a failed write
    (see WRITE_FAILURES) as a `WriteError` naming `path`."""
    path = Path(path)
    tmp = temporary_name(path)
    _remove(tmp)  # left by a killed process of the same pid
    try:
        if folder:
            tmp.mkdir()
        write(tmp)
        _share(tmp, folder)
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
    except WRITE_FAILURES as e:
        _remove(tmp)
        if isinstance(e, WriteError):
            raise
        raise WriteError(f"cannot write {path}: {reason_of(e)}", reason_of(e)) from e
    except BaseException:
        _remove(tmp)
        raise
    return path


def write_text(path, text: str) -> Path:
    """`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def remove_stale_temporaries(folder, name_glob: str = "*", only_dead: bool = False) -> None:
    """Delete the `.NAME.tmp-*` / `.NAME.old-*` temporaries under `folder` that killed processes left behind
    (call before writing there). `only_dead`: keep those whose process (the PID in the name) still runs here, for a
    folder that other processes may be writing to."""
    for pattern in (f".{name_glob}.tmp-*", f".{name_glob}.old-*"):
        for stale in Path(folder).glob(pattern):
            if not (only_dead and _running(stale.name.rpartition("-")[2])):
                _remove(stale)


def _running(pid: str) -> bool:
    """Whether the process `pid` (a temporary's suffix) runs on this machine."""
    if not pid.isdigit() or not 0 < int(pid) < 2**31:
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether it exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_writable(flag: str, folder) -> None:
    """Raise the ConfigError `--flag folder: cannot ...` unless `folder` can be created and written (not under a
    file, not on a read-only file system, permission): called before any model loads. It creates the folder
    and a probe file, then removes what it made, so a run that stops at a later check leaves nothing behind."""
    folder = Path(folder).absolute()
    made = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        for attempt in range(3):  # another torchrun rank may remove the folder it made while we probe it
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
    except OSError as e:
        what = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else reason_of(e)
        fail(flag, folder, f"cannot create or write this folder ({what}); choose a folder you can write to, or fix "
             "its permissions")
    finally:
        for p in made:  # deepest first
            try:
                p.rmdir()
            except OSError:  # never made (a file in the way), or another process is using it
                pass


def write_json(path: Path, obj: dict) -> None:
    """`obj` as indented, key-sorted JSON (a config.json of a model folder), folders made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def cache_dir() -> Path:
    """Where the tiny models (and the Inception weights) are kept: $SDXL_LORA_CACHE, else
    $XDG_CACHE_HOME/sdxl-lora, else ~/.cache/sdxl-lora."""
    if os.environ.get("SDXL_LORA_CACHE"):
        return Path(os.environ["SDXL_LORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdxl-lora"
