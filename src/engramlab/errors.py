"""The one user-facing error type.

Anything a user can get wrong (a path, a file's contents, an argument) raises `EngramError` with one sentence
that says what is wrong, where (file, line or argument) and what to do. The CLI prints that sentence and exits
with code 2; library callers can catch it. Internal bugs stay ordinary exceptions with their tracebacks.
"""


class EngramError(ValueError):
    """A clear, one-line error about user input."""
