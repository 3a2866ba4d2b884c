"""The console: what a script prints survives a reader that goes away, and the libraries keep their chatter.

`python train_sdxl.py ... 2>&1 | tee log`, then Ctrl-C: the terminal sends SIGINT to the whole process group, so
`tee` dies while the trainer finishes its step and saves. Its next write to the pipe fails with EPIPE (Python
ignores SIGPIPE, so that is a BrokenPipeError), as does every write after `| head -1` has read its line; a
closed terminal (SIGHUP) gives EIO. A failed write to the console must never cost the work it reports on, so
`install` wraps stdout and stderr in `Console`: the first failed write points the stream's file descriptor at
os.devnull, as Python's docs advise for SIGPIPE (https://docs.python.org/3/library/signal.html#note-on-sigpipe),
and the script goes on quietly and exits with its own status. `common.cli.run_script` installs it for every
script; tqdm's bars and `print` write through it.

`quiet_libraries`: transformers' and diffusers' progress bars ("Loading weights", "Writing model shards") and their
info/warning chatter are off unless a script's `--verbose` asks for them; our own bars stay.
"""

import importlib
import os
import sys

QUIET = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class Console:
    """A text stream (sys.stdout, sys.stderr) whose writes never raise: once one fails (the reader of the pipe is
    gone, the terminal closed), its file descriptor is pointed at os.devnull and the rest is dropped."""

    def __init__(self, stream):
        self.stream, self.gone = stream, False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.stream.write(text)
            except OSError:  # BrokenPipeError (EPIPE), EIO of a closed terminal
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except OSError:
                self._drop()

    def _drop(self) -> None:
        """From now on nothing reaches the reader; what the stream still buffers drains into os.devnull."""
        self.gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self.stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError):  # no file descriptor (e.g. pytest's capture): nothing to redirect
            pass

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the stream's own
        return getattr(self.stream, name)


def install() -> None:
    """Wrap sys.stdout and sys.stderr in `Console` (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, Console):
            setattr(sys, name, Console(stream))


def flush() -> None:
    """Flush stdout and stderr; a reader that is gone costs nothing (the exit status stays the script's)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:
                stream.flush()
            except OSError:  # a stream that is not ours (install was not called)
                pass


def quiet_libraries(verbose: bool = False) -> None:
    """transformers' and diffusers' progress bars and info/warning messages off (`verbose`: their defaults).

    Through their environment variables for the imports still to come (and for child processes), and through
    their own switches where they are imported already."""
    for variable, value in QUIET.items():  # a value the user set stays (unless it is ours and --verbose)
        if not verbose:
            os.environ.setdefault(variable, value)
        elif os.environ.get(variable) == value:
            del os.environ[variable]
    for library in ("transformers", "diffusers"):
        if library in sys.modules:
            logging = importlib.import_module(f"{library}.utils.logging")
            logging.set_verbosity(logging.WARNING if verbose else logging.ERROR)
            (logging.enable_progress_bar if verbose else logging.disable_progress_bar)()
