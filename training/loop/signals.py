"""Stopping a run cleanly: SIGTERM (schedulers, `kill`), SIGINT (Ctrl-C) or SIGHUP (the terminal closed, an ssh
connection dropped) finish the current optimizer step, save a checkpoint and exit with 128 + the signal number
(143 / 130 / 129), the shell's convention for "killed by this signal". Further signals while stopping are ignored,
so a second Ctrl-C during the save cannot leave half a checkpoint (the save is atomic anyway); SIGKILL still stops
the process at once, losing only the steps since the last checkpoint. A SIGHUP ignored when the run started
(`nohup`) stays ignored. Messages go to a console that may be gone (`| tee` killed by the same Ctrl-C, a closed
terminal): common/console.py keeps such a write from failing the stop.
"""

import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopRequest:
    """Context manager: while active, SIGTERM/SIGINT/SIGHUP only set `signum`; the loop polls it after each step."""

    SIGNALS = STOP_SIGNALS

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
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                              if not (s == signal.SIGHUP and signal.getsignal(s) is signal.SIG_IGN)}  # nohup
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
