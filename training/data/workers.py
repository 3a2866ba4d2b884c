"""DataLoader worker processes that never outlive the trainer.

Ctrl-C, SIGTERM and SIGHUP reach the whole process group, the workers included. The workers ignore them and leave
the stop to the trainer (training/loop/signals.py), which finishes its step and saves first: a worker that died of
the signal would make torch fail that step. So that they still end with the trainer:
- `init_worker` (their worker_init_fn) asks Linux to SIGKILL a worker as soon as the trainer is gone
  (prctl PR_SET_PDEATHSIG), whatever ended it (kill -9, an error);
- `Epochs.close` stops them through torch's own shutdown when the loop ends, while the interpreter still runs:
  at exit, multiprocessing would send them SIGTERM, which they ignore, and wait for them forever.
"""

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from itertools import islice

from training.loop.signals import STOP_SIGNALS

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def init_worker(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: ignore the stop signals (the trainer stops), die with the trainer."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    die_with_parent()


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent ends (elsewhere nothing happens: `Epochs.close` remains)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0),
                   ctypes.c_ulong(0))
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent ended before prctl: no signal will come
        os._exit(0)


class Epochs:
    """What `TrainingData.epochs` returns: `epochs(epoch, start)` -> that epoch's batches from batch `start`, one
    DataLoader (and its worker processes) at a time; `close()` stops the workers.

    `loader_of(epoch, start)` gives the epoch's DataLoader; `skip_start`: it starts at the epoch's first batch, so
    the first `start` batches are loaded and dropped (streamed shards)."""

    def __init__(self, loader_of: Callable, skip_start: bool = False):
        self.loader_of, self.skip_start, self.iterator = loader_of, skip_start, None

    def __call__(self, epoch: int, start: int = 0) -> Iterator[dict]:
        self.iterator = iter(self.loader_of(epoch, start))
        return islice(self.iterator, start, None) if self.skip_start else self.iterator

    def close(self) -> None:
        """Stop the worker processes now and wait for them (a no-op without workers, and when called again). A stop
        signal meanwhile waits until they are gone: half a shutdown would leave them to the exit's endless join."""
        iterator, self.iterator = self.iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's own, what the iterator's __del__ calls
        if shutdown is None:
            return  # no worker processes (num_workers 0)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            shutdown()
            for worker in getattr(iterator, "_workers", ()):  # torch stopped watching them: a straggler is killed
                if worker.is_alive():
                    worker.kill()
                    worker.join()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
