"""Multi-user layout: private home trees and a group-shared tree, as ownership and mode rules.

With ``--multi-user`` the mount root holds::

    home/           root, 0711: users can reach their own tree but not list the others
    home/<user>/    created on that user's first lookup, owned by them, 0700
    shared/         root:<group>, setgid; the group downloads once and reads together

The kernel enforces permissions (``default_permissions``) on what hubfs reports, so privacy and
sharing are just the right owners and modes. In the shared tree every new inode takes the
group and group read/write, whatever the creator's umask or a later chmod says (Hugging Face
creates blobs 0600 under a strict umask, lock files and refs that another member must rewrite),
and directories stay setgid. Others get what the operator chose: nothing, or read-only.
"""

from __future__ import annotations

import logging
import pwd
import stat
from dataclasses import dataclass

log = logging.getLogger(__name__)

HOME_DIR = b"home"
SHARED_DIR = b"shared"
HOME_ROOT_MODE = 0o711
HOME_MODE = 0o700
OTHERS_CHOICES = ("none", "read")


@dataclass(frozen=True)
class SharedTree:
    gid: int
    others: str = "none"  # "none" or "read"

    def __post_init__(self) -> None:
        if self.others not in OTHERS_CHOICES:
            raise ValueError(f"others must be one of {OTHERS_CHOICES}")

    def root_mode(self) -> int:
        return stat.S_ISGID | 0o770 | (0o005 if self.others == "read" else 0)

    def adjust_mode(self, mode: int) -> int:
        """The mode an inode in the shared tree gets, from the one its creator asked for."""
        kind = stat.S_IFMT(mode)
        perms = stat.S_IMODE(mode) & ~0o7077  # keep the owner bits as asked
        owner = perms >> 6
        group = owner | 0o6 if kind != stat.S_IFLNK else owner
        if stat.S_ISDIR(mode):
            group |= 0o7
            perms |= stat.S_ISGID
        others = 0
        if self.others == "read":
            others = 0o4 | (0o1 if stat.S_ISDIR(mode) or owner & 0o1 else 0)
        return kind | perms | (group << 3) | others


@dataclass(frozen=True)
class Policy:
    """What the mount enforces beyond plain POSIX; the default enforces nothing extra."""

    homes: bool = False
    shared: SharedTree | None = None


def user_name(uid: int) -> bytes | None:
    try:
        return pwd.getpwuid(uid).pw_name.encode()
    except KeyError:
        return None
