"""What every runner does with a user's mistake: one line on stderr naming the flag, exit status 2.

A user error is bad input (a flag value, a config file, a missing directory or checkpoint, a device
this machine lacks, an output that exists): the library raises ValueError, FileNotFoundError,
FileExistsError or KeyError with a message that names the field, the value and what to do. A runner
turns those into one line and status 2, the way argparse reports a bad flag, inside `user_input()`;
any other exception, or one raised outside `user_input()`, is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

USAGE_STATUS = 2  # argparse's status for a bad command line
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)


class UserError(SystemExit):
    """Exit with status 2 after the message was printed; str() is the printed line (for callers
    in-process), `message` the message alone."""

    def __init__(self, message: str):
        super().__init__(USAGE_STATUS)
        self.message = message

    def __str__(self) -> str:
        return f"error: {self.message}"


def fail(message: str) -> UserError:
    """Print `error: message` on stderr and return the exit to raise."""
    err = UserError(message)
    print(err, file=sys.stderr, flush=True)
    return err


@contextmanager
def user_input():
    """Inside: ValueError / FileNotFoundError / FileExistsError / KeyError are the user's, reported as one line."""
    try:
        yield
    except USER_ERRORS as err:
        # KeyError's str() is the repr of its argument; the message is the argument itself.
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise fail(str(message)) from None


def exit_status(main, argv=None) -> int:
    """Run main(argv): 0 when it returns, 2 (after the one line) on a user's mistake."""
    try:
        with user_input():
            main(argv)
    except UserError as err:
        return err.code
    return 0
