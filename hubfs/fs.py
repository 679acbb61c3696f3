"""The pyfuse3 adapter: FUSE requests in, ``vfs.FileSystem`` calls out, errors translated.

Nothing here decides anything about storage: each handler makes one call into the model
(which moves slow work to worker threads itself) and converts types. No handler lets an
exception escape, since that would end the mount: POSIX errors pass through, damaged data
becomes EIO (logged once per file), a user's mistake (a file too large) is answered without a
log line, anything unexpected is logged and becomes EIO.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from . import namespace, passthrough
from .errors import FsError, IntegrityError, StoreFullError
from .names import Caller
from .vfs import Attributes, FileSystem, OpenReply

log = logging.getLogger(__name__)

# Every change goes through this mount, so the kernel's caches cannot go stale behind it.
ENTRY_TIMEOUT_S = 300.0
ATTR_TIMEOUT_S = 300.0
BLKSIZE_BYTES = 128 * 1024
# Errors a request may rightly end in, answered without a log line.
USER_ERRNOS = (errno.EFBIG, errno.ENAMETOOLONG, errno.EINVAL)

T = TypeVar("T")
P = ParamSpec("P")


class RequestTimes:
    """How many requests of each kind the mount served and how long they took in the daemon
    (from the handler's start to its reply, waits for worker threads included): ``hubfs
    status`` shows them, to tell which requests a slow workload spends its time in. Owned by
    the trio thread, like every handler."""

    def __init__(self) -> None:
        self._count: Counter[str] = Counter()
        self._seconds: dict[str, float] = {}
        self._slowest: dict[str, float] = {}

    def add(self, op: str, seconds: float) -> None:
        self._count[op] += 1
        self._seconds[op] = self._seconds.get(op, 0.0) + seconds
        if seconds > self._slowest.get(op, 0.0):
            self._slowest[op] = seconds

    def report(self) -> dict[str, dict[str, float]]:
        """By request kind, most time first: count, total seconds, mean and slowest ms."""
        return {op: {"count": self._count[op], "total_s": round(total, 3),
                     "mean_ms": round(1e3 * total / self._count[op], 3),
                     "max_ms": round(1e3 * self._slowest[op], 3)}
                for op, total in sorted(self._seconds.items(), key=lambda kv: -kv[1])}


def request(func: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Translate whatever a handler raises into a FUSE error reply; time it."""

    @functools.wraps(func)
    async def handler(*args: P.args, **kwargs: P.kwargs) -> T:
        self = args[0]
        assert isinstance(self, Operations)
        start = time.perf_counter()
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except IntegrityError as exc:
            self.report_damage(func.__name__, args[1:], exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except StoreFullError as exc:
            log.error("%s: %s", func.__name__, exc.message)
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("%s: the disk holding the store is full", func.__name__)
                raise pyfuse3.FUSEError(errno.ENOSPC) from None
            if exc.errno in USER_ERRNOS:
                raise pyfuse3.FUSEError(exc.errno) from None
            log.exception("%s%r failed", func.__name__, args)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", func.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.times.add(func.__name__, time.perf_counter() - start)

    return handler


def entry(attrs: Attributes) -> pyfuse3.EntryAttributes:
    inode = attrs.inode
    out = pyfuse3.EntryAttributes()
    out.st_ino = attrs.ino
    out.generation = 0
    out.entry_timeout = ENTRY_TIMEOUT_S
    out.attr_timeout = ATTR_TIMEOUT_S
    out.st_mode = inode.mode
    out.st_nlink = inode.nlink
    out.st_uid = inode.uid
    out.st_gid = inode.gid
    out.st_rdev = inode.rdev
    out.st_size = attrs.size
    out.st_blksize = BLKSIZE_BYTES
    out.st_blocks = -(-attrs.size // 512)
    out.st_atime_ns = inode.atime_ns
    out.st_mtime_ns = attrs.mtime_ns
    out.st_ctime_ns = attrs.ctime_ns
    return out


def file_info(reply: OpenReply, flags: int) -> pyfuse3.FileInfo:
    return passthrough.file_info(reply.fh, reply.backing_id, reply.keep_cache,
                                 bool(flags & os.O_DIRECT))


def caller(ctx: Any) -> Caller | None:
    return None if ctx is None else Caller(ctx.pid, ctx.uid, ctx.gid)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False  # the kernel refuses passthrough with it
    write_context = True  # read by the patched pyfuse3: write() gets the writer

    def __init__(self, fs: FileSystem) -> None:
        super().__init__()
        self.fs = fs
        self.times = RequestTimes()
        self.enable_passthrough = fs.backing.refused is None  # read by the patched pyfuse3
        # Killpriv v2 (patched pyfuse3): the kernel then asks for security.capability once per
        # file rather than before every write (it marks the inode S_NOSEC after one look), and no
        # longer for the attributes before each chown; setuid/setgid bits and file capabilities
        # are dropped here (Names.drop_privileges): on WRITE requests, on truncates and chowns,
        # and, for a file the kernel writes itself (passthrough sends no WRITE), on the empty
        # SETATTR the kernel's own file_remove_privs sends (FileSystem.setattr).
        self.handle_killpriv_v2 = True

    def init(self) -> None:
        killpriv = getattr(pyfuse3, "killpriv_v2_enabled", None)
        self.fs.kills_privileges = bool(killpriv and killpriv())
        log.info("killpriv v2: %s", "on" if self.fs.kills_privileges else "off")
        on, why = self.fs.backing.status()  # the kernel has answered by now
        log.info("reads: %s (%s)", "kernel-served for files with an object" if on
                 else "served by the daemon", why)
        self._reported: set[int] = set()

    def report_damage(self, op: str, args: tuple[Any, ...], exc: IntegrityError) -> None:
        ino = args[0] if args and isinstance(args[0], int) else 0
        if op in ("read", "write", "fsync", "release"):
            try:
                ino = self.fs.open_files.handle(args[0]).ino
            except FsError:
                ino = 0
        if ino in self._reported:
            return
        self._reported.add(ino)
        with self.fs.store.read() as txn:
            names = namespace.paths(txn).get(ino, [b"<unknown>"])
        log.error("damaged data in %s (inode %d): %s", os.fsdecode(names[0]), ino, exc.message)

    # -- names and attributes
    @request
    async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return entry(await self.fs.lookup(parent, name, ctx.uid if ctx else 0))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        start = time.perf_counter()  # (a FORGET has no reply: errors are only logged)
        try:
            await self.fs.forget(inode_list)
        except Exception:
            log.exception("forget %r failed", inode_list)
        finally:
            self.times.add("forget", time.perf_counter() - start)

    @request
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return entry(await self.fs.attributes(inode))

    @request
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        kwargs: dict[str, int] = {}
        for wanted, key, value in (
                (fields.update_mode, "mode", attr.st_mode),
                (fields.update_uid, "uid", attr.st_uid),
                (fields.update_gid, "gid", attr.st_gid),
                (fields.update_atime, "atime_ns", attr.st_atime_ns),
                (fields.update_mtime, "mtime_ns", attr.st_mtime_ns),
                (fields.update_size, "size", attr.st_size)):
            if wanted:
                kwargs[key] = value
        kill = bool(getattr(fields, "kill_suidgid", False))  # killpriv v2 (patched pyfuse3)
        return entry(await self.fs.setattr(inode, **kwargs, caller=caller(ctx),
                                           kill_suidgid=kill))

    @request
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.fs.readlink(inode)

    @request
    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        return entry(await self.fs.make(parent, name, mode, ctx.uid, ctx.gid, rdev=rdev))

    @request
    async def mkdir(self, parent: int, name: bytes, mode: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        return entry(await self.fs.make(parent, name, stat.S_IFDIR | stat.S_IMODE(mode),
                                        ctx.uid, ctx.gid))

    @request
    async def symlink(self, parent: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        return entry(await self.fs.make(parent, name, stat.S_IFLNK | 0o777, ctx.uid, ctx.gid,
                                        target=target))

    @request
    async def link(self, inode: int, new_parent: int, new_name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        return entry(await self.fs.link(inode, new_parent, new_name))

    @request
    async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
        await self.fs.unlink(parent, name)

    @request
    async def rmdir(self, parent: int, name: bytes, ctx: Any) -> None:
        await self.fs.rmdir(parent, name)

    @request
    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        await self.fs.rename(parent_old, name_old, parent_new, name_new, flags)

    # -- directories
    @request
    async def opendir(self, inode: int, ctx: Any) -> int:
        await self.fs.opendir(inode)
        return inode

    @request
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for offset, name, attrs in await self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, entry(attrs), offset):
                break
            if name not in (b".", b".."):  # the kernel takes no reference to these
                self.fs.count_lookup(attrs.ino)

    @request
    async def releasedir(self, fh: int) -> None:
        return None

    @request
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.sync_index()

    # -- files
    @request
    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        reply, attrs = await self.fs.create(parent, name, mode, ctx.uid, ctx.gid)
        return file_info(reply, flags), entry(attrs)

    @request
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        return file_info(await self.fs.open(inode, flags, caller(ctx)), flags)

    @request
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    @request
    async def write(self, fh: int, off: int, buf: bytes, ctx: Any = None) -> int:
        return await self.fs.write(fh, off, buf, caller(ctx))

    async def flush(self, fh: int) -> None:
        # Nothing to do at close(): data is stored at release. ENOSYS tells the kernel to stop
        # sending FLUSH, which saves one round trip per close() for every reader.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @request
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @request
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    # -- extended attributes
    @request
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self.fs.setxattr(inode, name, value)

    @request
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return await self.fs.getxattr(inode, name)

    @request
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return await self.fs.listxattr(inode)

    @request
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.removexattr(inode, name)

    @request
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        host = await self.fs.statfs()
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail"):
            setattr(out, name, getattr(host, name))
        out.f_namemax = namespace.NAME_MAX_BYTES
        return out
