"""What the command lines share: one-line errors, a parser that speaks them, and the two-spelling flag helper.

Every script answers bad input with one line on stderr, `error: <what was wrong, the value, what to do>`,
and exit status 2 (argparse's own errors included, with the closest flag suggested for a mistyped one).
"""

import argparse
import difflib
import sys


class ConfigError(ValueError):
    """A bad flag, config file or value; its message is one line a user can act on."""


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

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=1) if word.startswith("-") else []
                if close:
                    message += f" (did you mean {close[0]}?)"
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
