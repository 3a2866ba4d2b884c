"""Every error the scripts answer with one line (and an exit status), in one place, so a script catches them
without importing the modules that raise them. Each message names the value and says what to do.
"""

import signal


class ConfigError(ValueError):
    """A bad flag, config file or value; its message is one line a user can act on."""


class DataError(ValueError):
    """Image data that cannot be used as given; the message says what is wrong and what to do."""


class WriteError(OSError):
    """A file or folder that could not be written (full disk, no permission); the message is one line naming
    it, `reason` says why in a few words."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class FolderInUse(ValueError):
    """An output folder locked by another living run (common/lock.py); the message names its pid, host, start
    time and command."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or used; the message names the path and what to do."""


class NoCheckpoint(CheckpointError):
    """A run's output folder without a complete, loadable checkpoint."""


class AlreadyFinished(Exception):
    """Resuming a run that has reached its length: nothing to train and nothing to write (exit status 0)."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why."""


class Stopped(Exception):
    """Raised by the loop after the stop checkpoint is written; main() exits with `exit_code`."""

    def __init__(self, signum: int, checkpoint):
        self.exit_code, self.checkpoint = 128 + signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a closed terminal, a dropped ssh) where a script has no stop handling of its own: handled
    as Ctrl-C (KeyboardInterrupt) is, ending with 128 + `signum` (common/cli.py `run_script`)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def interrupt_status(e: KeyboardInterrupt) -> int:
    """The exit status of an interrupted script: 128 + the signal (130 for Ctrl-C, 143 SIGTERM, 129 SIGHUP)."""
    return 128 + getattr(e, "signum", signal.SIGINT)


class PromptError(ValueError):
    """A prompt file that cannot be used; the message names the file, the line and what to do."""


class SettingsMismatch(ValueError):
    """An existing complete image group made with other settings; the message says which and what to do."""


class EvalError(ValueError):
    """Input the evaluation cannot use; the message is one line naming the value and what to do."""


class LpipsUnavailable(RuntimeError):
    """LPIPS cannot run here; the message is the one-line reason shown in the report."""
