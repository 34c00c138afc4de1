"""User mistakes, and the one way a command line reports them.

A mistake the user can fix (a config key, a config argument, a missing or unreadable file, a
dataset or variant that does not exist, a workdir started with another model, a mesh that does
not fit) raises a `UserError` naming the key, field or file and the way out. Every command of
e2_jax runs through `run` (absl's `app.run`) or `main` (argparse mains), which print it as one
`error: ...` paragraph and exit 2; flag and config-override mistakes found while the flags are
parsed are reported the same way. The traceback is printed as well with `--verbosity=1` (`-v 1`)
or `E2_TRACEBACK=1`. Anything else is a bug, and keeps its traceback.

The classes also derive from the built-in exception a caller would expect (`ValueError`,
`FileNotFoundError`), so library code may catch either.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake the user can fix; its message names what is wrong and the way out."""


class ConfigError(UserError, ValueError):
    """A config field, argument or combination that cannot run."""


class MissingError(UserError, FileNotFoundError):
    """A file, folder, checkpoint or dataset that is not where it was asked for."""


class ExistsError(UserError, FileExistsError):
    """An output that is already there (and is not overwritten without being asked)."""


class DataError(UserError, ValueError):
    """An input file that cannot be read as what it should be (the message names the file)."""


def suggest(name: str, known: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest of `known`, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _verbose() -> bool:
    if os.environ.get("E2_TRACEBACK", "") not in ("", "0"):
        return True
    try:
        from absl import flags  # deferred: only where absl parsed the command line

        return flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].value >= 1
    except Exception:
        return False


def fail(message: str, error: BaseException | None = None) -> NoReturn:
    """Prints `error: message` (and the traceback when verbose), exits 2."""
    if error is not None and _verbose():
        traceback.print_exception(error)
    print(f"error: {message.strip()}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def _message(error: BaseException) -> str:
    """One line from an error raised while parsing flags: a config override's unknown key (a
    KeyError that ml_collections wraps twice, the outer ones carrying its suggestion), or an
    error raised inside a config file (which absl hands over as a formatted traceback)."""
    chain = [error]
    while chain[-1].__context__ is not None:
        chain.append(chain[-1].__context__)
    if isinstance(chain[-1], KeyError) and chain[-1].args:
        hint = re.search(r'Did you mean "([^"]+)"', " ".join(str(e) for e in chain))
        return f"no config field {chain[-1].args[0]!r}" + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
    text = str(error)
    if "Traceback (most recent call last)" in text:  # the last line: the error the config file raised
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]*(Error|Exception): ", "", last.strip())
    return " ".join(text.split())


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, its mistakes reported as `error:` paragraphs: an unknown flag or
    config field, a value of the wrong type, a missing config file, a config argument the config
    does not take."""
    from absl import flags  # deferred: argparse mains do not need absl
    from ml_collections import config_flags

    try:
        rest = flags.FLAGS(argv)
    except flags.Error as error:
        message = _message(error)
        fail(message if "Traceback" in str(error) else f"{message}. Pass --helpshort to list the flags.", error)
    except Exception as error:
        override = next((arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")
                         and arg.split("=")[0].rsplit(".", 1)[-1] in str(error)), None)
        fail(f"{override + ': ' if override else ''}{_message(error)}", error)
    config_flag = getattr(config_flags.config_flags, "_ConfigFlag", ())  # ml_collections' own class
    for name in flags.FLAGS:
        holder = flags.FLAGS[name]
        if isinstance(holder, config_flag) and holder.present:
            try:
                getattr(holder.value, "_loaded", None)  # a config file that failed to load raises OSError here
            except OSError as error:
                path = config_flags.get_config_filename(holder)
                missing = not os.path.exists(path)
                fail(f"--{name}: " + (f"no config file {path}" if missing else _message(error)), error)
    return rest


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """absl's `app.run(main)` with the error path above: flag mistakes and `UserError`s print
    one `error:` paragraph and exit 2."""
    from absl import app  # deferred: argparse mains do not need absl

    try:
        app.run(main, argv=argv, flags_parser=parse_flags)
    except UserError as error:
        fail(str(error), error)


def main(function: Callable[[], Any]) -> Any:
    """An argparse main's body with the same error path (argparse reports its own flag errors)."""
    try:
        return function()
    except UserError as error:
        fail(str(error), error)
