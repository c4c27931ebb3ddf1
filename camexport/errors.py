"""The base of every error camexport raises for its users: a message naming the problem and the fix.

The CLI turns a :class:`CamexportError` into a one-line message; any other exception is a bug.
"""


class CamexportError(Exception):
    """A user-facing error: its message says what is wrong and what to do about it."""
