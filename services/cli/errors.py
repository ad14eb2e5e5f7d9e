"""How the CLI turns errors into exit codes: 2 bad input, 1 everything else that failed."""

from __future__ import annotations

from services.errors import Conflict, FerryError, InvalidInput, NotFound

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REJECTED = 2

REJECTIONS = (InvalidInput, NotFound, Conflict)


def exit_code(error: FerryError) -> int:
    return EXIT_REJECTED if isinstance(error, REJECTIONS) else EXIT_FAILED


def one_line(error: FerryError) -> str:
    where = f"{error.field}: " if error.field else ""
    return f"ferry: {where}{error.reason}"
