"""The base of every error that camexport raises for its user.

A :class:`CamexportError` carries a message that names the problem and the fix; the command line
prints it as one line (``Error: ...``, exit code 1) without a traceback. Each module's error class
derives from it and keeps its older base (``ValueError``, ``RuntimeError``), so that code catching
those still works. Any other exception out of camexport is a bug.
"""

from __future__ import annotations


class CamexportError(Exception):
    """A problem the user can fix: bad input, a missing package, an unsupported model."""
