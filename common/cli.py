"""What the command lines share: one-line errors, a parser that speaks them, the two-spelling flag helper, and
`run_script`, every script's `__main__`.

Every script answers bad input with one line on stderr, `error: <what was wrong, the value, what to do>`,
and exit status 2 (argparse's own errors included, with the closest flag suggested for a mistyped one).
This module imports nothing heavy: a script parses its flags before torch loads, so that `--help` and a
mistyped flag answer at once.
"""

import argparse
import difflib
import signal
import sys

from common import console
from common.errors import ConfigError, Interrupted, interrupt_status


def fail(flag: str, value, what: str):
    """Raise the ConfigError `--flag value: what`."""
    raise ConfigError(f"--{flag}{'' if value is None else f' {value}'}: {what}")


def print_error(message: str) -> int:
    """Print `error: message` as one line on stderr; return the exit status 2."""
    print("error: " + " ".join(str(message).split("\n")), file=sys.stderr)
    return 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its default prints the usage first) and a suggestion for a mistyped flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # an abbreviation today is an ambiguity tomorrow
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._words = list(sys.argv[1:] if args is None else args)  # for error(): a typo explains the rest
        return super().parse_known_args(args, namespace)

    def error(self, message):
        """One line; a mistyped flag is named first with its closest flag, even when argparse complains of
        something else it caused (`--promt x` makes --prompt "required")."""
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        words = getattr(self, "_words", [])
        words = words[: words.index("--")] if "--" in words else words
        for word in words:
            flag = word.split("=")[0]
            if flag.startswith("--") and flag not in known:
                close = difflib.get_close_matches(flag, known, n=1)
                if close:
                    message = f"unrecognized argument {flag} (did you mean {close[0]}?)"
                    break
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_flag(group, name: str, help: str, aliases: tuple[str, ...] = (), **kwargs) -> argparse.Action:
    """`--name` plus its other spelling (`--image_size` and `--image-size`); dest is always the underscore name.
    The spelling given first is the one `--help` shows first. `aliases`: other names accepted for the same flag
    (e.g. `resolution`, as other trainers call the image size)."""
    other = name.replace("_", "-") if "_" in name else name.replace("-", "_")
    names = [f"--{name}"] + ([f"--{other}"] if other != name else []) + [f"--{a}" for a in aliases]
    kwargs.setdefault("dest", name.replace("-", "_"))
    action = group.add_argument(*names, help=help, **kwargs)
    action.help = help  # BooleanOptionalAction on Python 3.10 appends its own "(default: ...)"; ours says it
    return action


def run_script(main) -> None:
    """A script's `__main__`: exit with main()'s status.

    - stdout and stderr survive a reader that goes away (`| head -1`; `| tee` killed by the same Ctrl-C): the
      script goes on quietly and its status stays main()'s, 0 when its work is done (common/console.py).
    - SIGTERM and SIGHUP (a closed terminal, a dropped ssh) are handled as Ctrl-C (`Interrupted`) wherever the
      script has no stop handling of its own (its imports, loading models): one line and status 128 + the signal
      (130, 143, 129); every write is atomic, so nothing half-written stays. A SIGHUP ignored when the script
      started (`nohup`) stays ignored."""
    console.install()
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _interrupt)
    try:
        status = main()
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({signal_name(e)}); nothing half-written was kept: run the same command again to go on",
              file=sys.stderr)
        status = interrupt_status(e)
    finally:
        console.flush()
    sys.exit(status)


def _interrupt(signum, frame):
    raise Interrupted(signum)


def signal_name(e: KeyboardInterrupt) -> str:
    """'Ctrl-C', 'SIGTERM' or 'SIGHUP': what interrupted a script."""
    return signal.Signals(e.signum).name if isinstance(e, Interrupted) else "Ctrl-C"


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """Every script's --verbose: transformers' and diffusers' progress bars and messages (common/console.py)."""
    parser.add_argument("--verbose", action="store_true", help="show transformers' and diffusers' progress bars "
                        "and info/warning messages too (default: off, only ours)")
