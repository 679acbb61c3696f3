"""Exceptions a user reads: each message names the cause and the fix.

Anything else that escapes is a bug and shows a traceback. ``FsError`` carries an errno for the
namespace layer, so the FUSE adapter can answer with it unchanged.
"""

from __future__ import annotations

import errno as errno_mod
import os


class HubfsError(Exception):
    """An error for the user: the CLI prints the message and exits with ``exitcode``."""

    def __init__(self, message: str, exitcode: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exitcode = exitcode


class StoreFormatError(HubfsError):
    """The directory is not a store, or a store of a format this version cannot read."""


class StoreFullError(HubfsError):
    """The disk holding the store ran out of space; nothing half-written was kept."""


class StoreBusyError(HubfsError):
    """Another process holds the store for writing."""


class IntegrityError(HubfsError):
    """Stored bytes do not match their checksum: never hand them out."""

    def __init__(self, message: str, chunk_id: bytes | None = None) -> None:
        super().__init__(message, exitcode=3)
        self.chunk_id = chunk_id


class FsError(Exception):
    """A POSIX error from the namespace, such as ENOENT or ENOTEMPTY."""

    def __init__(self, errno: int, detail: str = "") -> None:
        super().__init__(errno, detail or os.strerror(errno))
        self.errno = errno

    def __str__(self) -> str:
        name = errno_mod.errorcode.get(self.errno, str(self.errno))
        return f"{name}: {self.args[1]}"


class RemoteError(HubfsError):
    """The object store of a cluster store refused or failed a request; the message names it."""

    def __init__(self, message: str, exitcode: int = 5) -> None:
        super().__init__(message, exitcode)


class RemoteUnavailableError(RemoteError):
    """The object store did not answer within the bounded time; retrying later may succeed."""


class RemoteAuthError(RemoteError):
    """The object store rejected the credentials: the message names the setting to fix."""


class RemoteConflictError(RemoteError):
    """An immutable key already holds different bytes (two nodes with one name, say)."""


class RemoteIntegrityError(IntegrityError):
    """An object fetched from the object store does not match its id (damaged at rest)."""
