"""One base class for the errors a user can act on.

Every error the library raises for bad input (a file, a field, a flag, a value) derives from
:class:`CircuitPeftError`, a ``ValueError``, so callers can catch them all with one ``except``
and old ``except ValueError`` code keeps working. The message names what to fix: the file (and
line or field), the flag, or the argument, and the value that was refused.
"""

from __future__ import annotations


class CircuitPeftError(ValueError):
    """Bad input the user can fix; the message names the file, field, flag or argument."""


def located(where: str, message: str) -> CircuitPeftError:
    """A :class:`CircuitPeftError` whose message starts with ``where`` (``file:line``, ``file: field``,
    ``--flag`` or ``argument``), the way every refusal in the library is phrased."""
    return CircuitPeftError(f"{where}: {message}")
