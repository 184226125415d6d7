"""The one exception type for user mistakes (bad input, bad options, incompatible files).

The CLI prints a :class:`PyinvError` as one line on stderr and exits non-zero; anything
else is a bug and keeps its traceback.
"""


class PyinvError(ValueError):
    """A problem with what the user asked for, explained in one line."""
