"""Errors a user can cause. The CLI prints their message on one line and exits non-zero.

Each names the place: the file, the line, the field or the flag, so the user can fix it without a traceback.
"""


class UserError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class BadFileError(UserError):
    """A file or directory is missing, unreadable or malformed."""


class BadConfigError(UserError):
    """A flag, field or preset name has a bad value."""


class MismatchError(UserError):
    """Two things that must agree do not (a tokenizer and a checkpoint, say)."""
