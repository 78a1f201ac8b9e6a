"""The one user-facing error type.

Anything a user can get wrong (a path, a file's contents, an argument) raises `EngramError` with one sentence
that says what is wrong, where (file, line or argument) and what to do. The CLI prints that sentence and exits
with code 2; library callers can catch it. Internal bugs stay ordinary exceptions with their tracebacks.
"""


class EngramError(ValueError):
    """A clear, one-line error about user input."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message without its final period (its type's name if it has none): what
    an `EngramError` quotes of a failure inside a library."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__).rstrip(".")
