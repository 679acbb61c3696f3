"""The mount daemon's life: start (in the background by default), serve, stop cleanly.

``mount`` returns once the filesystem is mounted, like sshfs: the parent waits on a pipe for the
daemon's word that ``pyfuse3.init`` succeeded, or for its error message. The daemon never
touches its own mount point (it would deadlock); facts about the mount come from
``/proc/self/mountinfo``. On SIGTERM, SIGINT or an external unmount it stops serving, ingests
every file still being written, and closes the store, so nothing written is left behind.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from . import gc, repair
from .control import serve_control
from .errors import HubfsError
from .fs import Operations
from .materialise import DEFAULT_BUDGET_BYTES
from .policy import HOME_DIR, Policy
from .staging import INGEST_STEP_BYTES
from .store import Store
from .vfs import FileSystem

if TYPE_CHECKING:
    from .cluster import ClusterNode

log = logging.getLogger(__name__)

FS_TYPE = "fuse.hubfs"
LOG_NAME = "hubfs.log"
UMOUNT_WAIT_S = 600.0
GIL_SWITCH_INTERVAL_S = 0.0005
RECENT_ERRORS = 20


@dataclass(frozen=True)
class MountInfo:
    mountpoint: Path
    source: str
    device: str  # "major:minor"


def mounts() -> list[MountInfo]:
    """hubfs mounts of this machine, read from the kernel's table (never from the mounts)."""
    out = []
    with open("/proc/self/mountinfo") as table:
        for line in table:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if rfields and rfields[0] == FS_TYPE:
                point = fields[4].encode().decode("unicode_escape")
                out.append(MountInfo(Path(point), rfields[1].encode().decode("unicode_escape"),
                                     fields[2]))
    return out


def find_mount(mountpoint: Path) -> MountInfo | None:
    target = Path(os.path.abspath(mountpoint))
    for info in mounts():
        if info.mountpoint == target:
            return info
    return None


def check_mountpoint(store: Path, mountpoint: Path) -> None:
    point = Path(os.path.abspath(mountpoint))
    if find_mount(point) is not None:
        try:
            os.stat(point)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise HubfsError(
                    f"{point} is a stale hubfs mount (its daemon is gone): clear it with "
                    f"`hubfs umount {point}`, then mount again", 5) from None
        raise HubfsError(f"{point} is already a hubfs mount: `hubfs umount {point}` first", 5)
    if not point.is_dir():
        raise HubfsError(f"mount point {point} is not a directory: create it with "
                         f"`mkdir -p {point}`", 2)
    real_store = store.resolve()
    if real_store == point.resolve() or point.resolve() in real_store.parents:
        raise HubfsError(f"the store {store} lies inside the mount point {point}: keep the store "
                         "outside (e.g. /var/lib/hubfs), the daemon must never read through "
                         "its own mount", 2)


def fuse_options(store: Path, allow_other: bool, extra: list[str]) -> set[str]:
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options |= {f"fsname={store.resolve()}", "subtype=hubfs"}
    if allow_other:
        options.add("allow_other")
    for item in extra:
        options.update(o for o in item.split(",") if o)
    return options


def mount(store: Path, mountpoint: Path, *, foreground: bool = False, allow_other: bool = False,
          options: list[str] | None = None, policy: Policy | None = None,
          ingest_step_bytes: int = INGEST_STEP_BYTES, checked_reads: bool = False,
          materialise_budget_bytes: int = DEFAULT_BUDGET_BYTES,
          cache_bytes: int | None = None) -> None:
    """``cache_bytes``: a cluster store's new ``--cache-size`` (0: unbounded; None: keep)."""
    check_mountpoint(store, mountpoint)
    opts = fuse_options(store, allow_other, options or [])
    policy = policy or Policy()
    if foreground:
        serve(store, mountpoint, opts, policy, ingest_step_bytes, checked_reads,
              materialise_budget_bytes, cache_bytes, ready=lambda msg: None)
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        os.setsid()
        code = 0
        try:
            _detach(store)

            def ready(message: str) -> None:
                os.write(write_end, message.encode())
                os.close(write_end)

            serve(store, mountpoint, opts, policy, ingest_step_bytes, checked_reads,
                  materialise_budget_bytes, cache_bytes, ready)
        except BaseException:
            log.exception("hubfs daemon failed")
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    if message != "ok":
        os.waitpid(pid, 0)
        raise HubfsError(message or f"the hubfs daemon died while mounting; see {store / LOG_NAME}",
                         5)


def _detach(store: Path) -> None:
    """Send the daemon's output to the store's log file; stdio to /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.FileHandler(store / LOG_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: "
                                           "%(message)s"))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)


def serve(store_path: Path, mountpoint: Path, options: set[str], policy: Policy,
          ingest_step_bytes: int, checked_reads: bool, materialise_budget_bytes: int,
          cache_bytes: int | None, ready: Callable[[str], None]) -> None:
    """Mount and serve until unmounted or signalled; reports readiness through ``ready``."""
    # Worker threads chunk and hash in Python: with the default 5 ms GIL switch interval every
    # request on the trio thread could wait that long behind them.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    recent_errors = RecentErrors()
    logging.getLogger().addHandler(recent_errors)
    try:
        store = Store(store_path, sync_each_commit=False)
    except HubfsError as exc:
        ready(exc.message)
        return
    node = None
    try:
        fs = FileSystem(store, policy, ingest_step_bytes, checked_reads,
                        materialise_budget_bytes)
        try:
            node = cluster_node(store, fs, cache_bytes)
        except HubfsError as exc:
            ready(exc.message)
            return
        trio.run(fs.recover)  # (a cluster node's fetcher is set: a staging's base may need it)
        ops = Operations(fs)
        try:
            pyfuse3.init(ops, str(mountpoint), options)
        except RuntimeError as exc:
            ready(f"cannot mount {mountpoint}: {exc}; check that fuse3 is installed "
                  "(apt-get install fuse3), that /dev/fuse exists and is read-writable by you "
                  "(Debian makes it 0666: `chmod 0666 /dev/fuse` as root), and for "
                  "--allow-other as a normal user that /etc/fuse.conf has user_allow_other")
            return
        log.info("mounted %s at %s (options %s)", store_path, mountpoint, sorted(options))
        ready("ok")

        def run_gc(progress: Callable[[int, int], None], full: bool = False) -> dict[str, int]:
            result = gc.collect(store, progress, False, full).to_dict()
            repair.snapshot_or_warn(store.index, store.path)
            return result

        started = time.time()

        async def status(progress: Callable[[int, int], None]) -> dict[str, Any]:
            report = _status_report(fs, started, recent_errors)
            report["requests"] = ops.times.report()
            if node is not None:
                report["cluster"] = node.status()
            return report

        commands: dict[str, Callable[..., Any]] = {
            "gc": run_gc, "gc-full": lambda progress: run_gc(progress, True), "status": status}
        background = []
        if node is not None:
            commands["sync"] = node.sync_now
            background += [node.run, node.cache.run]
        else:
            async def not_a_cluster(progress: Callable[[int, int], None]) -> None:
                raise HubfsError(f"{store_path} is not a cluster store, nothing to sync: "
                                 "make one with `hubfs init STORE --remote s3://BUCKET/PREFIX`",
                                 2)

            commands["sync"] = not_a_cluster
        trio.run(_serve_until_stopped, fs, commands, background)
        repair.snapshot_or_warn(store.index, store.path)
        log.info("unmounted %s", mountpoint)
    finally:
        if node is not None:
            node.close()
        store.close()


def cluster_node(store: Store, fs: FileSystem, cache_bytes: int | None = None
                 ) -> ClusterNode | None:
    """The cluster side of a mount of a cluster store (hubfs.cluster), started; else None.
    ``cache_bytes``: a new ``--cache-size`` to record (0: unbounded; None: keep the store's)."""
    if store.cluster_config() is None:
        if cache_bytes is not None:
            raise HubfsError(f"--cache-size bounds what a node of a cluster store keeps; "
                             f"{store.path} is not one (`hubfs init STORE --remote URL` makes "
                             "one)", 2)
        return None  # a plain store: the S3 client is never imported
    from .cluster import ClusterNode, config_of, set_cache_size

    if cache_bytes is not None:
        set_cache_size(store, cache_bytes or None)
    config = config_of(store)
    assert config is not None
    node = ClusterNode(store, config)
    node.cache.held = fs.held_open
    node.cache.dropped_object = fs.materialiser.dropped
    node.cache.reads = lambda: (fs.content_read_bytes, node.fetched_bytes)
    fs.content_used = node.cache.used
    node.busy = lambda ino: fs.writeback.busy(ino) or fs.writeback.staged(ino) is not None
    node.settle = fs.writeback.settle
    node.unlinked = fs._remove_if_unused  # a name another node removed: as an unlink does
    node.invalidate = _invalidate_entry
    node.start()
    log.info("node %s of the cluster store %s", config.node, config.remote)
    return node


def _invalidate_entry(parent: int, name: bytes) -> None:
    """A name changed behind the kernel's back (another node's change); from a worker thread."""
    try:
        pyfuse3.invalidate_entry(parent, name)
    except OSError as exc:  # ENOENT: the kernel does not cache it
        log.debug("invalidate %d %r: %s", parent, name, exc)


class RecentErrors(logging.Handler):
    """The daemon's last errors, for ``hubfs status``."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: collections.deque[str] = collections.deque(maxlen=RECENT_ERRORS)

    def emit(self, record: logging.LogRecord) -> None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        self.records.append(f"{when} {record.getMessage().splitlines()[0]}")


def _status_report(fs: FileSystem, started: float, errors: RecentErrors) -> dict[str, Any]:
    """What ``hubfs status`` shows: read on the trio thread, so it is one consistent moment."""
    disk = os.statvfs(fs.store.path)
    snapshots = sorted((fs.store.path / repair.SNAPSHOT_DIR).glob("*"), key=lambda p: p.stat().st_mtime)
    return {
        "pid": os.getpid(),
        "uptime_s": round(time.time() - started, 1),
        "store": str(fs.store.path),
        **fs.status(),
        "decoded_cache_bytes": fs.store.reader.cached_bytes(),
        "index_bytes": fs.store.index.disk_bytes(),
        "last_snapshot": (time.strftime("%Y-%m-%d %H:%M:%S",
                                        time.localtime(snapshots[-1].stat().st_mtime))
                          if snapshots else None),
        "recent_errors": list(errors.records),
        "free_bytes": disk.f_bavail * disk.f_frsize,
        "disk_bytes": disk.f_blocks * disk.f_frsize,
    }


async def _serve_until_stopped(fs: FileSystem, commands: dict[str, Callable[..., Any]],
                               background: list[Callable[[], Any]] | None = None) -> None:
    """Serve requests until unmounted, then store everything still staged."""
    async with fs.running():
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
                nursery.start_soon(serve_control, fs.store, commands)
                nursery.start_soon(_snapshot_periodically, fs.store)
                nursery.start_soon(fs.sync_periodically)
                for task in background or []:
                    nursery.start_soon(task)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)


async def _snapshot_periodically(store: Store) -> None:
    while True:
        await trio.sleep(repair.SNAPSHOT_INTERVAL_S)
        await trio.to_thread.run_sync(repair.snapshot_or_warn, store.index, store.path)


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


def umount(mountpoint: Path, timeout_s: float = UMOUNT_WAIT_S) -> None:
    """Unmount, then wait until the daemon has stored everything and exited."""
    info = find_mount(mountpoint)
    if info is None:
        raise HubfsError(f"{mountpoint} is not a hubfs mount (see `mount -t fuse.hubfs`)", 2)
    pid = _daemon_pid(Path(info.source))
    result = subprocess.run(["fusermount3", "-u", str(info.mountpoint)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        detail = result.stderr.strip()
        if "busy" in detail.lower():
            raise HubfsError(f"{mountpoint} is busy: files or working directories under it are "
                             f"still in use (see `fuser -vm {mountpoint}`); close them and retry",
                             5)
        raise HubfsError(f"cannot unmount {mountpoint}: {detail}", 5)
    if pid is None:
        return
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            raise HubfsError(f"the hubfs daemon (pid {pid}) is still storing files after "
                             f"{timeout_s:.0f}s; it keeps going, see {info.source}/{LOG_NAME}", 5)
        time.sleep(0.05)


def _daemon_pid(store: Path) -> int | None:
    try:
        return int((store / "lock").read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a child of ours (foreground tests) that exited is a zombie until reaped
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return _status(pid) != "Z"


def _status(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return "Z"


def env_lines(mountpoint: Path, user: str | None = None) -> list[str]:
    """Shell exports that point the ML libraries' caches into the mount: into the user's
    private tree when the mount has ``home/`` (multi-user mode)."""
    root = Path(os.path.abspath(mountpoint))
    home_root = root / HOME_DIR.decode()
    if user is None:
        user = pwd.getpwuid(os.getuid()).pw_name
    if home_root.is_dir() and root.resolve() != home_root.resolve():
        root = home_root / user
    return [
        f"export XDG_CACHE_HOME={root}",
        f"export HF_HOME={root / 'huggingface'}",
        f"export TORCH_HOME={root / 'torch'}",
        # TF Hub ignores XDG and defaults to a temp dir.
        f"export TFHUB_CACHE_DIR={root / 'tfhub_modules'}",
    ]

