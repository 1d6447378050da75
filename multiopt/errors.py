"""The one exception type that means "the user asked for something that cannot be done".

The CLI turns a `UsageError` into a single line on stderr and exit code 2; everything else
is a bug and keeps its traceback. Subclasses of ValueError so library users can catch
either.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input: an unknown optimizer, a bad keyword, an unclaimed parameter, a corrupt file.

    The message must name the culprit and, where possible, say what to do next.
    """


def one_line(e: BaseException) -> str:
    """An exception as the one line a user reads: its message's first line, or its type's name
    where the message is empty."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
