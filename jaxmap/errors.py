"""The one exception type that means "the user asked for something wrong".

Command-line entry points catch :class:`UserError`, print its message as one line and exit with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class UserError(Exception):
    """Bad input from the user: a path, a flag, a file, a layout. The message says what is wrong and how to fix it."""

    exit_code = 2

    def __str__(self) -> str:  # keep it to one line whatever the caller passed
        return " ".join(str(self.args[0]).split()) if self.args else "invalid input"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with jaxmap's one-line errors: a malformed flag (``--max-new-tokens x``) prints ``error: ...`` and
    exits with status 2, like every other user error, instead of the usage block and ``prog: error:``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")
