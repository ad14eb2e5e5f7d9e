"""The argument parser every `ferry` command, built in or from a plugin, is made with."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, NoReturn

from services.cli.errors import EXIT_REJECTED

if TYPE_CHECKING:
    from typing import TypeAlias

    # What a plugin's `register` receives: `ferry`'s subcommands, to add its own to.
    Subcommands: TypeAlias = argparse._SubParsersAction["Parser"]


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_REJECTED)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value
