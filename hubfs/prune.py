"""Pruning by last use: which whole cache entries of each ML library to remove, and removing them.

Pure functions over a directory tree (a mount or any directory): ``scan`` finds the caches of
Hugging Face (hub and ``datasets``), torch.hub and TF Hub and cuts them into entries each library
can lose without noticing anything but a cache miss; ``select`` picks entries by last use;
``plan`` turns them into removals; ``execute`` does them with ordinary file operations. An
entry's last use is the newest ``max(st_atime, st_mtime)`` of its files (a fresh download counts
as a use). Directories are first renamed out of the library's sight, then deleted, so an
interrupted prune never leaves a half-deleted entry the library would take for a cache hit.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HubfsError

HF_REPO_RE = re.compile(r"(models|datasets|spaces)--.+")
HEX40_RE = re.compile(r"[0-9a-f]{40}")
HEX64_RE = re.compile(r"[0-9a-f]{64}")
TRASH_NAME = ".hubfs-prune-trash"
DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
              "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_duration_s(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s`` (a bare number is days)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not match:
        raise HubfsError(f"{text!r} is not a duration: write e.g. 30d, 12h, 2w", 2)
    return float(match[1]) * DURATION_UNITS_S[match[2] or "d"]


def parse_size_bytes(text: str) -> int:
    """``500G`` (decimal, as ``hubfs stats`` prints sizes), ``500GiB`` (binary), ``1.5T``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise HubfsError(f"{text!r} is not a size: write e.g. 500G, 1.5T, 200GiB", 2)
    return int(float(match[1]) * SIZE_UNITS[match[2] or ""])


@dataclass(frozen=True)
class FileUse:
    """A file an entry holds: its size and identity (so shared blobs count once)."""

    key: tuple[int, int]
    size: int


@dataclass
class Entry:
    """One removable unit of one library's cache.

    ``root`` is the cache directory (an HF hub cache, a TORCH_HOME/hub, a TF Hub cache, a datasets
    cache); ``files`` are the regular files it uses (for an HF revision: the blobs its snapshot
    points to, which other revisions may share).
    """

    library: str  # "huggingface", "torch.hub", "tfhub", "datasets"
    kind: str
    name: str
    root: Path
    main: Path  # the directory or file that is the entry
    uid: int
    last_used_s: float
    files: dict[Path, FileUse] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())


# -- finding the caches
def _stat(path: Path, follow: bool = True) -> os.stat_result | None:
    try:
        return os.stat(path, follow_symlinks=follow)
    except OSError:
        return None


def _used_s(st: os.stat_result) -> float:
    return max(st.st_atime, st.st_mtime)


def _add_file(entry: Entry, path: Path) -> None:
    """Count a regular file (following symlinks) in ``entry``."""
    st = _stat(path)
    if st is None or not stat.S_ISREG(st.st_mode):
        return
    entry.files[path] = FileUse((st.st_dev, st.st_ino), st.st_size)
    entry.last_used_s = max(entry.last_used_s, _used_s(st))


def _add_tree(entry: Entry, top: Path) -> None:
    """Every regular file below ``top`` (not following directory symlinks)."""
    if top.is_file() or top.is_symlink():
        _add_file(entry, top)
        return
    for dirpath, _dirnames, filenames in os.walk(top):
        for name in filenames:
            _add_file(entry, Path(dirpath) / name)


def _new(library: str, kind: str, name: str, root: Path, main: Path) -> Entry:
    """An entry whose last use starts at its directory's mtime (a download into it), never its
    atime: listing a directory, as any scan (this one too) does, updates that."""
    st = _stat(main, follow=False)
    return Entry(library, kind, name, root, main, st.st_uid if st else -1,
                 st.st_mtime if st and stat.S_ISDIR(st.st_mode) else 0.0)


def _children(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []


def is_hf_hub_cache(path: Path) -> bool:
    return any(e.is_dir(follow_symlinks=False) and HF_REPO_RE.fullmatch(e.name)
               and (Path(e.path) / "snapshots").is_dir() for e in _children(path))


def is_torch_hub_cache(path: Path) -> bool:
    return path.name == "hub" and (path.parent.name == "torch" or (path / "checkpoints").is_dir()
                                   or (path / "trusted_list").is_file())


def is_tfhub_cache(path: Path) -> bool:
    names = {e.name for e in _children(path)}
    return path.name == "tfhub_modules" or any(
        n.endswith(".descriptor.txt") and n.removesuffix(".descriptor.txt") in names
        for n in names)


def is_datasets_cache(path: Path) -> bool:
    return path.name == "datasets" and path.parent.name == "huggingface" and path.is_dir()


def hf_revisions(root: Path) -> Iterator[Entry]:
    """One entry per snapshot of each repo (model, dataset or space) of an HF hub cache."""
    for repo in _children(root):
        if not (repo.is_dir(follow_symlinks=False) and HF_REPO_RE.fullmatch(repo.name)):
            continue
        repo_path = Path(repo.path)
        refs = hf_refs(repo_path)
        for snap in _children(repo_path / "snapshots"):
            if not snap.is_dir(follow_symlinks=False):
                continue
            names = sorted(ref for ref, commit in refs.items() if commit == snap.name)
            label = f"{repo.name}@{snap.name[:10]}" + (f" ({', '.join(names)})" if names else "")
            entry = _new("huggingface", "revision", label, root, Path(snap.path))
            _add_tree(entry, Path(snap.path))
            yield entry


def hf_refs(repo: Path) -> dict[str, str]:
    """ref name (``main``, ``refs/pr/1``) -> commit hash, from ``refs/``."""
    out: dict[str, str] = {}
    refs = repo / "refs"
    for dirpath, _dirnames, filenames in os.walk(refs):
        for name in filenames:
            path = Path(dirpath) / name
            try:
                out[path.relative_to(refs).as_posix()] = path.read_text().strip()
            except OSError:
                continue
    return out


def torch_entries(root: Path) -> Iterator[Entry]:
    """Each checkpoint file of ``checkpoints/`` and each downloaded repo directory."""
    for item in _children(root / "checkpoints"):
        if item.is_file(follow_symlinks=False) and not item.name.endswith(".partial"):
            entry = _new("torch.hub", "checkpoint", f"checkpoints/{item.name}", root,
                         Path(item.path))
            _add_file(entry, Path(item.path))
            yield entry
    for item in _children(root):
        if item.is_dir(follow_symlinks=False) and item.name not in ("checkpoints", TRASH_NAME):
            entry = _new("torch.hub", "repo", item.name, root, Path(item.path))
            _add_tree(entry, Path(item.path))
            yield entry


def tfhub_entries(root: Path) -> Iterator[Entry]:
    """Each module directory (named by the sha1 of its handle)."""
    for item in _children(root):
        if item.is_dir(follow_symlinks=False) and HEX40_RE.fullmatch(item.name):
            entry = _new("tfhub", "module", item.name, root, Path(item.path))
            _add_tree(entry, Path(item.path))
            for suffix in (".descriptor.txt", ".lock"):
                _add_file(entry, root / f"{item.name}{suffix}")
            yield entry


def datasets_entries(root: Path) -> Iterator[Entry]:
    """Each prepared dataset directory (``<builder>/<config>/<version>/<hash>``, the one holding
    ``dataset_info.json``) and each download (``downloads/<hash>`` with its ``.json`` and
    ``.lock``, ``downloads/extracted/<hash>``)."""
    downloads = root / "downloads"
    for item in _children(downloads):
        if HEX64_RE.fullmatch(item.name) and item.is_file(follow_symlinks=False):
            entry = _new("datasets", "download", f"downloads/{item.name[:12]}", root,
                         Path(item.path))
            for suffix in ("", ".json", ".lock"):
                _add_file(entry, downloads / f"{item.name}{suffix}")
            yield entry
    for item in _children(downloads / "extracted"):
        if item.is_dir(follow_symlinks=False):
            entry = _new("datasets", "extracted", f"downloads/extracted/{item.name[:12]}", root,
                         Path(item.path))
            _add_tree(entry, Path(item.path))
            yield entry
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root:
            dirnames[:] = [d for d in dirnames if d not in ("downloads", TRASH_NAME)]
            continue
        if "dataset_info.json" in filenames:
            dirnames[:] = []
            entry = _new("datasets", "dataset", here.relative_to(root).as_posix(), root, here)
            _add_tree(entry, here)
            yield entry


def find_caches(top: Path) -> list[tuple[str, Path]]:
    """(library, cache directory) below ``top``, not looking inside a cache once found."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, _filenames in os.walk(top):
        here = Path(dirpath)
        kind = ("torch.hub" if is_torch_hub_cache(here) else
                "huggingface" if is_hf_hub_cache(here) else
                "datasets" if is_datasets_cache(here) else
                "tfhub" if is_tfhub_cache(here) else None)
        if kind is not None:
            found.append((kind, here))
            dirnames[:] = []
        else:
            dirnames[:] = sorted(d for d in dirnames if d != TRASH_NAME)
    return found


SCANNERS: dict[str, Callable[[Path], Iterator[Entry]]] = {
    "huggingface": hf_revisions, "torch.hub": torch_entries, "tfhub": tfhub_entries,
    "datasets": datasets_entries,
}


def scan(top: Path) -> list[Entry]:
    """Every prunable entry of every cache below ``top``."""
    return [entry for library, root in find_caches(top) for entry in SCANNERS[library](root)]


# -- choosing
def select(entries: list[Entry], *, now_s: float, unused_for_s: float | None = None,
           keep_bytes: int | None = None) -> list[Entry]:
    """Entries unused for longer than ``unused_for_s``, or, with ``keep_bytes``, those left over
    once the most recently used entries fill ``keep_bytes`` (least recently used go first; a
    file shared by kept entries counts once)."""
    if unused_for_s is not None:
        return [e for e in entries if e.last_used_s < now_s - unused_for_s]
    if keep_bytes is None:
        raise ValueError("give unused_for_s or keep_bytes")
    kept: set[tuple[int, int]] = set()
    kept_bytes = 0
    chosen: list[Entry] = []
    full = False
    for entry in sorted(entries, key=lambda e: e.last_used_s, reverse=True):
        new = {f.key: f.size for f in entry.files.values() if f.key not in kept}
        if not full and kept_bytes + sum(new.values()) <= keep_bytes:
            kept |= new.keys()
            kept_bytes += sum(new.values())
        else:
            full = True  # strictly least recently used: nothing older is kept
            chosen.append(entry)
    return chosen


# -- planning
@dataclass(frozen=True, eq=False)
class Removal:
    """Remove ``path`` (a file, or a directory with everything below it), part of ``entry``."""

    path: Path
    frees: int  # bytes of regular files that go with it
    entry: Entry


@dataclass
class Plan:
    entries: list[Entry]
    removals: list[Removal]
    frees_bytes: int
    notes: list[str] = field(default_factory=list)


def _files_size(paths: Iterable[Path]) -> int:
    total = 0
    for path in paths:
        st = _stat(path, follow=False)
        if st is not None and stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total


def _tree_size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return _files_size([path])
    return sum(_files_size(Path(d) / n for n in names) for d, _, names in os.walk(path))


def _removal(path: Path, entry: Entry) -> Removal:
    return Removal(path, _tree_size(path), entry)


def plan_removals(entries: list[Entry], chosen: list[Entry]) -> Plan:
    """What to remove so each library sees whole entries gone, nothing half there.

    An HF revision takes its refs first (a ref to a missing snapshot is a corrupt cache for
    ``scan_cache_dir``), then its snapshot and ``.no_exist/<commit>``, then the blobs no kept
    revision of the repo points to; a repo losing every revision goes whole, with its
    ``.locks/`` directory. Blobs that are symlinks into a cache-wide Xet blob store lose only the
    link (``hf cache`` sweeps that store).
    """
    chosen_ids = {id(e) for e in chosen}
    removals: list[Removal] = []
    notes: list[str] = []
    by_repo: dict[Path, list[Entry]] = {}
    claimed: set[Path] = set()
    for entry in entries:
        if entry.library == "huggingface":
            by_repo.setdefault(entry.main.parent.parent, []).append(entry)
    for repo, revisions in by_repo.items():
        going = [e for e in revisions if id(e) in chosen_ids]
        if not going:
            continue
        if len(going) == len(revisions):
            removals.append(_removal(repo, going[0]))
            locks = repo.parent / ".locks" / repo.name
            if locks.is_dir():
                removals.append(_removal(locks, going[0]))
            continue
        kept_blobs = {_blob_of(p) for e in revisions if id(e) not in chosen_ids for p in e.files}
        refs = hf_refs(repo)
        for entry in going:
            commit = entry.main.name
            removals += [_removal(repo / "refs" / ref, entry) for ref, c in refs.items()
                         if c == commit]
        for entry in going:
            removals.append(_removal(entry.main, entry))
            for extra in (repo / ".no_exist" / entry.main.name, repo / "trees" / entry.main.name):
                if extra.exists():
                    removals.append(_removal(extra, entry))
        for entry in going:
            for blob in sorted({_blob_of(p) for p in entry.files} - kept_blobs):
                if blob.parent == repo / "blobs" and blob not in claimed:
                    claimed.add(blob)  # shared by two going revisions: removed once
                    removals.append(Removal(blob, 0 if blob.is_symlink() else
                                            _files_size([blob]), entry))
    for entry in chosen:
        if entry.library == "huggingface":
            continue
        if entry.library == "tfhub":
            removals.append(_removal(entry.main, entry))
            removals += [_removal(entry.root / f"{entry.main.name}{suffix}", entry)
                         for suffix in (".descriptor.txt", ".lock")
                         if (entry.root / f"{entry.main.name}{suffix}").exists()]
        elif entry.library == "datasets" and entry.kind == "download":
            removals += [_removal(p, entry) for p in entry.files]
        elif entry.library == "datasets" and entry.kind == "dataset":
            removals.append(_removal(entry.main, entry))
            removals += [_removal(p, entry) for p in _dataset_locks(entry)]
        else:
            removals.append(_removal(entry.main, entry))
    return Plan(chosen, removals, sum(r.frees for r in removals), notes)


def _blob_of(snapshot_file: Path) -> Path:
    """The ``blobs/<etag>`` a snapshot entry points to (itself when it is not a symlink)."""
    if not snapshot_file.is_symlink():
        return snapshot_file
    return Path(os.path.normpath(snapshot_file.parent / os.readlink(snapshot_file)))


def _dataset_locks(entry: Entry) -> list[Path]:
    """The lock files ``datasets`` keeps for a prepared dataset: beside it, and in the cache
    root named after its path with ``/`` replaced by ``_``."""
    main = entry.main
    out = [p for p in (main.parent / f"{main.name}_builder.lock",
                       main.parent / f"{main.name}.lock") if p.exists()]
    suffix = "_" + main.relative_to(entry.root).as_posix().replace("/", "_") + ".lock"
    out += [Path(e.path) for e in _children(entry.root)
            if e.name.endswith(suffix) and e.is_file(follow_symlinks=False)]
    return out


# -- doing
def _trash(path: Path) -> Path:
    """Where a directory goes before it is deleted: beside its cache, out of the library's
    sight (``huggingface/``, ``torch/``, ``~/.cache``), on the same filesystem."""
    for parent in path.parents:
        if parent.name in ("hub", "datasets", "tfhub_modules"):
            return parent.parent / TRASH_NAME
    return path.parent.parent / TRASH_NAME


def execute(plan: Plan, progress: Callable[[int], None] | None = None) -> None:
    """Remove everything in the plan with unlink, rename and rmdir; ``progress(bytes)``."""
    trashes: set[Path] = set()
    for removal in plan.removals:
        st = _stat(removal.path, follow=False)
        if st is None:
            continue  # gone already (removed with its repo, or by its library meanwhile)
        if stat.S_ISDIR(st.st_mode):
            trash = _trash(removal.path)
            trash.mkdir(mode=0o700, exist_ok=True)
            trashes.add(trash)
            moved = trash / f"{removal.path.name}.{uuid.uuid4().hex[:8]}"
            os.rename(removal.path, moved)
            shutil.rmtree(moved)
        else:
            os.unlink(removal.path)
        if progress is not None:
            progress(removal.frees)
    for trash in trashes:
        shutil.rmtree(trash, ignore_errors=True)


def stale_trash(top: Path) -> list[Path]:
    """Trash directories an interrupted prune left behind."""
    return [Path(d) / TRASH_NAME for d, dirnames, _ in os.walk(top) if TRASH_NAME in dirnames]


# -- reporting
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _where(entry: Entry, top: Path) -> str:
    try:
        return entry.root.relative_to(top).as_posix()
    except ValueError:
        return str(entry.root)


@dataclass(frozen=True)
class SummaryRow:
    cache: str  # the cache directory, relative to what was scanned
    library: str
    user: str
    removed: int  # entries
    kept: int
    frees_bytes: int


def summary(plan: Plan, entries: list[Entry], top: Path) -> list[SummaryRow]:
    """One row per cache directory and user. Freed bytes are file sizes as seen through the mount; what the store
    gives back (``hubfs gc``) is less where other files hold the same bytes."""
    rows: dict[tuple[str, str, str], list[int]] = {}
    chosen = {id(e) for e in plan.entries}
    for entry in entries:
        row = rows.setdefault((_where(entry, top), entry.library, user_name(entry.uid)),
                              [0, 0, 0])
        row[0 if id(entry) in chosen else 1] += 1
    for removal in plan.removals:
        entry = removal.entry
        rows[(_where(entry, top), entry.library, user_name(entry.uid))][2] += removal.frees
    return [SummaryRow(*key, *value) for key, value in sorted(rows.items())]


def age(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.0f}d" if days >= 1 else f"{seconds / 3600:.0f}h"


def now_s() -> float:
    return time.time()
