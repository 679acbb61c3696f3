"""A tiny pyfuse3 filesystem for test_passthrough: two names over one real backing file.

``/a`` and ``/b`` are two inodes whose contents are the file given on the command line, opened
through hubfs.passthrough (kernel-served) unless ``--no-passthrough``; the daemon serves reads
itself when passthrough is off or refused. ``/reads`` reports, as JSON, how many READ requests
for ``/a`` and ``/b`` reached the daemon and what hubfs.passthrough says about the mount.

Usage: python -m tests.passthrough_fs BACKING MOUNTPOINT [--no-passthrough]
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from typing import Any

import pyfuse3
import trio

from hubfs import passthrough

ROOT = pyfuse3.ROOT_INODE
NAMES = {b"a": 2, b"b": 3}
CONTROL_NAME, CONTROL = b"reads", 4
CONTROL_BYTES = 512  # fixed size: the JSON is padded with spaces


class TwoNames(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, backing: str, use_passthrough: bool) -> None:
        super().__init__()
        self.backing = backing
        self.enable_passthrough = use_passthrough
        self.backing_fd = os.open(backing, os.O_RDONLY)
        self.table = passthrough.BackingTable()
        self.reads = 0
        self.passthrough_opens = 0
        self.next_fh = 1
        self.fh_inode: dict[int, tuple[int, bool]] = {}

    def init(self) -> None:
        on, why = self.table.status()
        print(f"passthrough {'on' if on else 'off'}: {why}", file=sys.stderr, flush=True)

    def _control(self) -> bytes:
        on, why = self.table.status()
        state = {"reads": self.reads, "passthrough_opens": self.passthrough_opens,
                 "enabled": passthrough.enabled(), "on": on, "why": why,
                 "held": self.table.held()}
        return json.dumps(state).encode().ljust(CONTROL_BYTES)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.attr_timeout = 0
        attr.entry_timeout = 0
        if inode == ROOT:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        elif inode in NAMES.values():
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = os.fstat(self.backing_fd).st_size
        elif inode == CONTROL:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = CONTROL_BYTES
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_blksize = 4096
        attr.st_blocks = (attr.st_size + 511) // 512
        return attr

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name == CONTROL_NAME:
            return await self.getattr(CONTROL)
        if name not in NAMES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(NAMES[name])

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = [*NAMES.items(), (CONTROL_NAME, CONTROL)]
        for index, (name, inode) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, await self.getattr(inode), index):
                break

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self.next_fh
        self.next_fh += 1
        if inode == CONTROL:
            self.fh_inode[fh] = (inode, False)
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        if inode not in NAMES.values():
            raise pyfuse3.FUSEError(errno.ENOENT)
        backing_id = self.table.acquire(inode, self.backing,
                                        lambda: os.open(self.backing, os.O_RDONLY))
        self.fh_inode[fh] = (inode, backing_id is not None)
        if backing_id is not None:
            self.passthrough_opens += 1
        return passthrough.file_info(fh, backing_id, keep_cache=True, direct_io=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        inode, _ = self.fh_inode[fh]
        if inode == CONTROL:
            return self._control()[off:off + size]
        self.reads += 1
        return os.pread(self.backing_fd, size, off)

    async def release(self, fh: int) -> None:
        inode, kernel_served = self.fh_inode.pop(fh)
        if kernel_served:
            self.table.release(inode)


def main() -> None:
    backing, mountpoint = sys.argv[1], sys.argv[2]
    ops = TwoNames(backing, use_passthrough="--no-passthrough" not in sys.argv[3:])
    options = set(pyfuse3.default_options) | {"fsname=passthrough_fs"}
    pyfuse3.init(ops, mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
