"""A store on disk: layout, format checks, the writer lock, and the engine's parts wired up.

Layout (outside any mount)::

    STORE/HUBFS     marker: {"format": N}; tells a store from any other directory
    STORE/index/    LMDB environment (hubfs.index)
    STORE/packs/    pack files (hubfs.packs)
    STORE/objects/  one file per large content, the kernel's backing files (hubfs.objects)
    STORE/staging/  files being written through a mount, until ingested
    STORE/lock      flock'd by the one process that writes (a mount, an import)

Readers (``ls``, ``cat``, ``stats``, ``verify``) open read-only and take no lock, so they work
while the store is mounted.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from . import compression, contents, namespace
from .chunking import ChunkerParams
from .errors import HubfsError, StoreBusyError, StoreFormatError
from .index import Index, Txn
from .ingest import Ingestor
from .objects import ObjectFiles, object_ids
from .packs import PackFiles, PackWriter
from .reader import ContentReader

log = logging.getLogger(__name__)

# 2: objects (hubfs.objects). A format 1 store is upgraded in place when it is first opened
# for writing: it gains the objects directory and the (empty) objects database.
FORMAT_VERSION = 2
UPGRADABLE_FORMATS = (1,)
MARKER = "HUBFS"
CLUSTER_META = "cluster"  # index meta key: JSON {"remote": URL, "node": NAME} (hubfs.cluster)


class IngestGate:
    """Many ingests at once (shared), or one gc step alone (exclusive); gc waits its turn
    and, once waiting, goes before new ingests so it cannot starve."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.enter_shared()
        try:
            yield
        finally:
            self.exit_shared()

    def enter_shared(self, wait: bool = True) -> bool:
        """Count one ingest in once no gc step runs or waits (False, without ``wait``, if one
        does). An ingest may leave (``exit_shared``) from another thread than the one it
        entered on: the mount prepares in a worker and registers on its trio thread."""
        with self._cond:
            while self._exclusive or self._waiting:
                if not wait:
                    return False
                self._cond.wait()
            self._shared += 1
            return True

    def exit_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.enter_exclusive()
        try:
            yield
        finally:
            self.exit_exclusive()

    def enter_exclusive(self) -> None:
        """Wait until no ingest is in flight and hold them off. The mount's cache eviction
        waits for it in a worker and leaves (``exit_exclusive``) on its trio thread."""
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True

    def exit_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()


class Store:
    def __init__(self, path: Path, readonly: bool = False, sync_each_commit: bool = True
                 ) -> None:
        self.path = path
        self.readonly = readonly
        self._lock_fd = -1
        # Held shared from an ingest's first index lookup to its commit; gc takes it alone.
        self.ingest_gate = IngestGate()
        # Chunks at refcount 0 that a file being written still needs: gc must keep them.
        self.pinned: Counter[bytes] = Counter()
        self.pinned_lock = threading.Lock()
        old_format = _check_marker(path, upgrade=not readonly)
        if not readonly:
            self._lock_fd = _take_lock(path)
        try:
            self.index = Index(path / "index", readonly=readonly,
                               sync_each_commit=sync_each_commit)
            if old_format:
                _upgrade(path, self.index, old_format)
            settings = self.index.settings()
            if settings.get("format") != FORMAT_VERSION:
                raise StoreFormatError(
                    f"the index of {path} has format {settings.get('format')!r}, this hubfs "
                    f"reads format {FORMAT_VERSION}: use the hubfs version that made it")
            self.settings = settings
            try:
                self.params = ChunkerParams.from_dict(settings["chunker"])
                if settings["compression"] not in compression.POLICIES:
                    raise ValueError(f"unknown compression {settings['compression']!r}")
            except (TypeError, ValueError) as exc:
                raise StoreFormatError(f"the settings in the index of {path} are damaged "
                                       f"({exc}): `hubfs verify --repair` restores a snapshot",
                                       3) from None
            self.packs = PackFiles(path / "packs", path / "objects")
            self.reader = ContentReader(self.index, self.packs)
            self.writer: PackWriter | None = None
            self.ingestor: Ingestor | None = None
            self.objects: ObjectFiles | None = None
            if not readonly:
                self.writer = PackWriter(path / "packs", settings["pack_target_bytes"])
                self.objects = ObjectFiles(path / "objects")
                self.ingestor = Ingestor(self.index, self.writer, self.params,
                                         settings["compression"])
        except BaseException:
            self._release_lock()
            raise

    # -- lifecycle
    @classmethod
    def init(cls, path: Path, compression_policy: str = "auto",
             params: ChunkerParams | None = None, pack_target_bytes: int | None = None) -> None:
        """Create an empty store at ``path`` (a new or empty directory)."""
        from .packs import PACK_TARGET_BYTES

        if compression_policy not in compression.POLICIES:
            raise HubfsError(f"unknown compression policy {compression_policy!r}: choose one of "
                             f"{', '.join(compression.POLICIES)}", 2)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            if (path / MARKER).exists():
                raise HubfsError(f"{path} is already a hubfs store", 2)
            raise HubfsError(f"{path} exists and is not an empty directory: choose a new path", 2)
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            for sub in ("index", "packs", "objects", "staging"):
                (path / sub).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise HubfsError(f"cannot create the store at {path}: {exc.strerror}; choose a path "
                             "you may write to", 2) from None
        settings = {
            "format": FORMAT_VERSION,
            "chunker": (params or ChunkerParams()).to_dict(),
            "compression": compression_policy,
            "pack_target_bytes": pack_target_bytes or PACK_TARGET_BYTES,
        }
        index = Index(path / "index", create=True)
        try:
            with index.write() as txn:
                txn.meta_put("settings", json.dumps(settings).encode())
                namespace.init_root(txn, os.getuid(), os.getgid())
                contents.empty_content(txn)
        finally:
            index.close()
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT_VERSION}) + "\n")
        os.replace(tmp, path / MARKER)
        log.info("initialised store %s (%s)", path, settings)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sync_index()
        self.packs.close()
        self.index.close()
        self._release_lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- transactions
    @contextmanager
    def write(self) -> Iterator[Txn]:
        """A write transaction, opened only after every appended pack byte is durable."""
        if self.writer is None:
            raise HubfsError(f"store {self.path} is open read-only", 2)
        self.writer.sync()
        with self._transaction() as txn:
            yield txn

    @contextmanager
    def metadata_write(self) -> Iterator[Txn]:
        """A write transaction for changes that reference no newly appended pack bytes (names,
        attributes, or content whose packs the caller synced): it waits for no fsync."""
        if self.writer is None:
            raise HubfsError(f"store {self.path} is open read-only", 2)
        with self._transaction() as txn:
            yield txn

    @contextmanager
    def _transaction(self) -> Iterator[Txn]:
        """An index write; when its commit is durable at once (an index that syncs each
        commit), so are the names of objects made for it, first (else ``sync_index`` does)."""
        with self.index.write() as txn:
            yield txn
            if self.index.sync_each_commit and self.objects is not None:
                self.objects.sync_directory()

    def read(self) -> Any:
        return self.index.read()

    def sync_index(self) -> None:
        """Make every committed index change durable, after the names of the objects it may
        name and the pack bytes it may point at (a durable index never points at data an OS
        crash could lose; chunks a cluster node fetched commit before their packs sync)."""
        if self.objects is not None:
            self.objects.sync_directory()
        if self.writer is not None:
            self.writer.sync()
        self.index.sync()

    def cluster_config(self) -> dict[str, str] | None:
        """``{"remote": URL, "node": NAME}`` if this store is a node of a cluster store
        (hubfs.cluster; kept apart so that a plain store never imports the S3 client)."""
        with self.index.read() as txn:
            raw = txn.meta_get(CLUSTER_META)
        return json.loads(raw) if raw is not None else None

    def held_locally(self, content_id: bytes) -> bool:
        """Whether every chunk of a content is in this store (a cluster node may hold only
        its chunk table: the bytes are in the bucket until read, hubfs.cluster)."""
        with self.index.read() as txn:
            table = txn.content(content_id)
            if table is None:
                return False
            return all((e := txn.chunk(c)) is not None and not e.location.remote
                       for c in dict.fromkeys(table.chunk_ids))

    def object_of(self, content_id: bytes) -> int | None:
        """The object holding a content's bytes, if it has one (hubfs.objects)."""
        with self.index.read() as txn:
            return txn.object_of(content_id)

    # -- reports
    def stats(self) -> dict[str, Any]:
        with self.index.read() as txn:
            files = logical = 0
            for _ino, inode in txn.inodes():
                if stat.S_ISREG(inode.mode):
                    files += 1
                    logical += inode.size
            trees = _tree_stats(txn)
            chunks = unique = stored = dead = remote = 0
            for _cid, entry in txn.chunks():
                if entry.location.remote:  # a cluster node's chunk not fetched (yet)
                    remote += entry.location.raw_len if entry.refcount > 0 else 0
                elif entry.refcount > 0:
                    chunks += 1
                    unique += entry.location.raw_len
                    stored += entry.location.stored_len
                else:
                    dead += entry.location.stored_len
            objects = sum(1 for _ in txn.objects())
            materialised = [size for _oid, _cid, size in txn.materialised()]
        pack_bytes = sum(f.stat().st_size for f in (self.path / "packs").glob("*.pack"))
        object_bytes = sum(self.packs.path(o).stat().st_size
                           for o in object_ids(self.path / "objects"))
        stored_bytes = pack_bytes + object_bytes + self.index.disk_bytes()
        return {
            "files": files,
            "logical_bytes": logical,
            "unique_bytes": unique,
            "stored_bytes": stored_bytes,
            "chunk_stored_bytes": stored,
            "unreferenced_bytes": dead,
            "remote_only_bytes": remote,
            "pack_bytes": pack_bytes,
            "object_bytes": object_bytes,
            "objects": objects,
            "materialised_objects": len(materialised),
            "materialised_bytes": sum(materialised),
            "index_bytes": self.index.disk_bytes(),
            "chunks": chunks,
            "dedup_ratio": round(logical / (unique + remote), 4) if unique + remote else 1.0,
            "compression_ratio": round(unique / stored, 4) if stored else 1.0,
            "trees": trees,
        }


def tree_of(path: bytes) -> str:
    """The tree a path belongs to: ``home/<user>`` for private trees, else its top directory."""
    parts = path.strip(b"/").split(b"/")
    if parts[0] == b"home" and len(parts) > 2:
        return os.fsdecode(b"/".join(parts[:2]))
    return os.fsdecode(parts[0]) if len(parts) > 1 else "/"


def _tree_stats(txn: Txn) -> dict[str, dict[str, int]]:
    """Per tree: logical bytes, unique bytes, and the bytes it shares with other trees (what
    dedup saved it, beyond its own repeats: ``logical - exclusive``)."""
    sizes: dict[bytes, int] = {}
    owners: dict[bytes, set[str]] = {}
    per_tree: dict[str, dict[str, int]] = {}
    chunk_sets: dict[str, set[bytes]] = {}
    paths = namespace.paths(txn)
    for ino, inode in txn.inodes():
        if not stat.S_ISREG(inode.mode) or ino not in paths:
            continue
        tree = tree_of(paths[ino][0])
        row = per_tree.setdefault(tree, {"files": 0, "logical_bytes": 0})
        row["files"] += 1
        row["logical_bytes"] += inode.size
        table = txn.content(inode.content_id)
        if table is None:
            continue
        ids = chunk_sets.setdefault(tree, set())
        for chunk_id, length in zip(table.chunk_ids, table.lengths):
            ids.add(chunk_id)
            sizes[chunk_id] = length
            owners.setdefault(chunk_id, set()).add(tree)
    for tree, ids in chunk_sets.items():
        row = per_tree[tree]
        row["unique_bytes"] = sum(sizes[c] for c in ids)
        row["exclusive_bytes"] = sum(sizes[c] for c in ids if len(owners[c]) == 1)
        row["dedup_saved_bytes"] = row["logical_bytes"] - row["exclusive_bytes"]
    return dict(sorted(per_tree.items()))


def _upgrade(path: Path, index: Index, old_format: int) -> None:
    """Bring a store of an older format to this one, in place (the lock is held)."""
    (path / "objects").mkdir(mode=0o700, exist_ok=True)
    with index.write() as txn:  # the index opened the new databases; settings name the format
        upgrade_settings(txn)
    index.sync()
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT_VERSION}) + "\n")
    os.replace(tmp, path / MARKER)
    log.warning("upgraded store %s from format %d to %d (objects for kernel-served reads)",
                path, old_format, FORMAT_VERSION)


def upgrade_settings(txn: Txn) -> None:
    """Record this format in an index of an older one (every older format upgrades by
    adding what is new, which an index opened for writing has already created)."""
    raw = txn.meta_get("settings")
    settings = json.loads(raw) if raw else None
    if isinstance(settings, dict) and settings.get("format") in UPGRADABLE_FORMATS:
        settings["format"] = FORMAT_VERSION
        txn.meta_put("settings", json.dumps(settings).encode())


def _check_marker(path: Path, upgrade: bool = False) -> int:
    """Check the store's marker; returns the old format to upgrade from (0: current)."""
    if not path.is_dir():
        raise StoreFormatError(f"store {path} does not exist: create one with `hubfs init {path}`",
                               2)
    marker = path / MARKER
    try:
        info = json.loads(marker.read_text())
        version = int(info["format"])
    except FileNotFoundError:
        raise StoreFormatError(
            f"{path} is not a hubfs store (no {MARKER} file): create one with "
            f"`hubfs init NEWDIR`, or name the directory `hubfs init` made", 2) from None
    except PermissionError:
        raise StoreFormatError(f"permission denied reading store {path}: run as its owner "
                               "(stores are private to the user or root who made them)", 2) from None
    except OSError as exc:
        raise StoreFormatError(f"cannot read {marker} ({exc.strerror}): it should be a small file "
                               f'reading {{"format": {FORMAT_VERSION}}}', 2) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreFormatError(f"{marker} is damaged ({exc}): it should read "
                               f'{{"format": {FORMAT_VERSION}}}', 2) from None
    if version > FORMAT_VERSION:
        raise StoreFormatError(
            f"store {path} has format {version}, newer than this hubfs reads ({FORMAT_VERSION}): "
            "upgrade hubfs", 2)
    if version < FORMAT_VERSION:
        if version in UPGRADABLE_FORMATS:
            if upgrade:
                return version
            raise StoreFormatError(
                f"store {path} has the old format {version}: open it for writing once to "
                f"upgrade it in place (`hubfs mount` or `hubfs gc {path}`)", 2)
        raise StoreFormatError(
            f"store {path} has the old format {version}; this hubfs reads {FORMAT_VERSION}: "
            "use an older hubfs to export it, then import into a new store", 2)
    return 0


def _take_lock(path: Path) -> int:
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreBusyError(
            f"store {path} is in use by another hubfs process (pid {holder}), probably a mount: "
            "work through the mount, or `hubfs umount` it first", 4) from None
    try:  # the pid only helps messages; a full disk must not stop the store from opening
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        log.info("cannot record the pid in %s: %s", path / "lock", exc)
    return fd
