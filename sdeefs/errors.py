"""Domain errors of sdeefs.

Library code raises ``OSError`` (with a real errno) for anything a filesystem
caller should see, and the exceptions below for everything else.  ``ops.py`` is
the one place that turns either kind into ``pyfuse3.FUSEError``; the command
line turns :class:`QuietError` into one line on stderr and an exit code.
"""

from __future__ import annotations

import enum
import errno


class ExitCode(enum.IntEnum):
    """The exit codes of every sdeefs command (README, "Using it")."""

    OK = 0
    FAILURE = 1  # anything not below
    USAGE = 2  # bad arguments or configuration
    UNAVAILABLE = 3  # a prerequisite is missing: no FUSE, not root, a daemon not running
    BUSY = 4  # mountpoint busy or not empty, state in use, an environment of another engine
    UNMOUNT = 5  # an unmount failed or a daemon did not exit in time
    JOURNAL_DAMAGED = 6
    CHECK_FAILED = 7  # `sdeefs check` found problems


class QuietError(Exception):
    """A user-facing error: printed as one line, no traceback, then ``exit(exitcode)``."""

    def __init__(self, message: str, exitcode: int = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.exitcode = exitcode


class JournalCorrupt(Exception):
    """The journal holds a record that fails its checksum or framing *before* its tail.

    A torn tail (the last, partially written record) is not corruption: it is
    truncated silently on open.  Damage followed by valid records is.
    """


class BadRecord(ValueError):
    """A journal record or replication frame that is malformed or unsafe to apply.

    Raised by decoders on hostile input; the caller logs it and changes nothing.
    """


class PathTooLong(BadRecord):
    """A path longer than a record field carries (``records.MAX_PATH``).

    The daemon refuses such an operation with ENAMETOOLONG before anything is
    journaled; from a peer or a journal it is a bad record like any other.
    """


class FailsafeError(OSError):
    """Mutations are refused because the journal could not be written.

    Mapped to EROFS at the FUSE boundary: after a journal failure the
    filesystem turns read-only rather than accept writes it cannot journal.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EROFS, f"sdeefs is read-only after a journal failure: {reason}")
