"""Stopping a run cleanly: SIGTERM (schedulers, `kill`) or SIGINT (Ctrl-C) finish the current
optimizer step, save a checkpoint and exit with 128 + the signal number (143 / 130), the shell's
convention for "killed by this signal". Further signals while stopping are ignored, so a second
Ctrl-C during the save cannot leave half a checkpoint (the save is atomic anyway); SIGKILL still
stops the process at once, losing only the steps since the last checkpoint.
"""

import signal
import sys
import threading


class StopRequest:
    """Context manager: while active, SIGTERM/SIGINT only set `signum`; the loop polls it after each step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and exiting",
                  file=sys.stderr, flush=True)
        else:
            print(f"{signal.Signals(signum).name} again: already stopping, the checkpoint is being written",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: Ctrl-C reaches the whole process group; workers leave it to the trainer."""
    for s in StopRequest.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
