"""The ``hubfs`` command line: argument parsing, logging set-up, and user-facing errors.

Every subcommand is a thin call into the engine. ``HubfsError`` becomes one line on stderr and
its exit code; anything else is a bug and keeps its traceback.

Commands that read a store run in a forked child: LMDB maps the index, and a damaged page
that points past the end of data.mdb kills the reader with SIGBUS (or SIGSEGV), which no
handler can catch. The parent turns such a death into the same one line as any other damage.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import signal
import stat
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import lmdb

from . import namespace
from .errors import FsError, HubfsError
from .importer import export_tree, import_tree
from .index import Inode
from .progress import human_bytes
from .store import Store
from .verify import FILE_TYPES, VerifyReport, verify

log = logging.getLogger(__name__)


def parse_cache_size(text: str) -> int:
    """``--cache-size``: a size as ``hubfs prune --keep-size`` takes it, or ``unlimited`` (0)."""
    from .prune import parse_size_bytes

    if text.strip().lower() == "unlimited":
        return 0
    size = parse_size_bytes(text)
    if size <= 0:
        raise HubfsError("--cache-size must be above 0 (or `unlimited`)", 2)
    return size


def cmd_init(args: argparse.Namespace) -> int:
    if args.node and not args.remote:
        raise HubfsError("--node names a node of a cluster store: give --remote too", 2)
    if args.cache_size and not args.remote:
        raise HubfsError("--cache-size bounds what a node of a cluster store keeps: give "
                         "--remote too", 2)
    cache_bytes = parse_cache_size(args.cache_size) if args.cache_size else 0
    Store.init(args.store, compression_policy=args.compression)
    if args.remote:
        from .cluster import init_remote

        try:
            config = init_remote(args.store, args.remote, args.node, cache_bytes or None)
        except BaseException:
            shutil.rmtree(args.store, ignore_errors=True)  # made just now, empty
            raise
        print(f"initialised hubfs store at {args.store} (compression: {args.compression}), "
              f"node {config.node} of the cluster store {config.remote}")
        return 0
    print(f"initialised hubfs store at {args.store} (compression: {args.compression})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .repair import snapshot

    with Store(args.store) as store:
        start = time.monotonic()
        try:
            report = import_tree(store, args.src, args.dest)
        except BaseException:
            try:  # what earlier batches committed; a full disk must not hide the real error
                snapshot(store.index, store.path)
            except (OSError, lmdb.Error) as exc:
                log.info("no index snapshot after the failed import: %s", exc)
            raise
        snapshot(store.index, store.path)
        elapsed = time.monotonic() - start
    print(f"imported {report.files} files ({human_bytes(report.bytes)}), {report.dirs} "
          f"directories, {report.symlinks} symlinks, {report.hardlinks} hard links in "
          f"{elapsed:.1f}s; {human_bytes(report.new_stored_bytes)} new bytes stored")
    if report.errors:
        for err in report.errors[:20]:
            print(f"  could not import {err}", file=sys.stderr)
        raise HubfsError(f"{len(report.errors)} entries could not be read (listed above); "
                         "everything else was imported and the store is consistent: fix their "
                         "permissions and run the import again", 1)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with Store(args.store, readonly=True) as store:
        files = export_tree(store, args.path, args.dest)
    print(f"exported {files} files to {args.dest}")
    return 0


def _store_path(store: Store, path: str) -> tuple[int, Inode]:
    with store.read() as txn:
        try:
            ino = namespace.resolve(txn, path)
            return ino, namespace.get(txn, ino)
        except FsError as exc:
            raise HubfsError(f"{path}: not in the store ({exc}); list it with `hubfs ls` (if it "
                             "should be there, the index is damaged: run `hubfs verify --repair "
                             f"{store.path}`)", 2) from None


def cmd_ls(args: argparse.Namespace) -> int:
    with Store(args.store, readonly=True) as store:
        ino, inode = _store_path(store, args.path)
        with store.read() as txn:
            if stat.S_ISDIR(inode.mode):
                rows = [(name, namespace.get(txn, child))
                        for _seq, name, child in namespace.readdir(txn, ino)]
            else:
                rows = [(os.fsencode(args.path), inode)]
    for name, node in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(node.mtime_ns / 1e9))
        line = (f"{stat.filemode(node.mode)} {node.nlink:3d} {node.uid:5d} {node.gid:5d} "
                f"{node.size:12d} {when} {os.fsdecode(name)}")
        if stat.S_ISLNK(node.mode):
            line += f" -> {os.fsdecode(node.target)}"
        print(line)
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    with Store(args.store, readonly=True) as store:
        _ino, inode = _store_path(store, args.path)
        if not stat.S_ISREG(inode.mode):
            if stat.S_IFMT(inode.mode) not in FILE_TYPES:
                raise HubfsError(f"{args.path}: the index records an unknown file type "
                                 f"({inode.mode:o}), so the index is damaged: run "
                                 f"`hubfs verify --repair {args.store}`", 3)
            raise HubfsError(f"{args.path} is not a regular file", 2)
        out = sys.stdout.buffer
        for data in store.reader.pieces(inode.content_id):  # to the content's own size
            out.write(data)
        out.flush()
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with Store(args.store, readonly=True) as store:
        stats = store.stats()
        config = store.cluster_config()
        if config is not None:
            from .cache import report

            limit = config.get("cache_bytes")
            stats["cache"] = report(store, limit if isinstance(limit, int) else None,
                                    stats["pack_bytes"] + stats["object_bytes"])
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    rows = [
        ("files", str(stats["files"])),
        ("logical size", human_bytes(stats["logical_bytes"])),
        ("unique chunks", f"{stats['chunks']} ({human_bytes(stats['unique_bytes'])})"),
        ("stored on disk", human_bytes(stats["stored_bytes"])),
        ("objects (kernel-served)", f"{stats['objects']} ({human_bytes(stats['object_bytes'])})"),
        ("of which copies on demand", (f"{stats['materialised_objects']} "
                                      f"({human_bytes(stats['materialised_bytes'])})")),
        ("unreferenced (gc frees)", human_bytes(stats["unreferenced_bytes"])),
        ("dedup ratio", f"{stats['dedup_ratio']:.2f}x"),
        ("compression ratio", f"{stats['compression_ratio']:.2f}x"),
    ]
    if stats["remote_only_bytes"]:
        rows.append(("only in the cluster bucket", human_bytes(stats["remote_only_bytes"])))
    if "cache" in stats:
        cache = stats["cache"]
        limit = cache["limit_bytes"]
        rows += [("cluster cache use / limit", (f"{human_bytes(cache['used_bytes'])} / "
                  f"{human_bytes(limit) if limit else 'unlimited'}")),
                 ("cluster cache evicted", (f"{human_bytes(cache['evicted_bytes'])} "
                  f"({cache['evicted_contents']} contents)")),
                 ("cluster cache hit rate", "-" if cache["hit_rate"] is None else
                  f"{cache['hit_rate']:.1%} ({human_bytes(cache['read_bytes'])} read, "
                  f"{human_bytes(cache['fetched_bytes'])} fetched)")]
    for key, value in rows:
        print(f"{key:26s} {value}")
    if len(stats["trees"]) > 1:
        print(f"\n{'tree':26s} {'files':>7s} {'logical':>10s} {'own bytes':>10s} "
              f"{'dedup saved':>12s}")
        for tree, row in stats["trees"].items():
            print(f"{tree:26s} {row['files']:7d} {human_bytes(row['logical_bytes']):>10s} "
                  f"{human_bytes(row.get('exclusive_bytes', 0)):>10s} "
                  f"{human_bytes(row.get('dedup_saved_bytes', 0)):>12s}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.repair:
        from .repair import repair

        fixed = repair(args.store)
        for note in fixed.notes:
            print(f"repair: {note}")
        print(f"repair: {fixed.relocated} chunk locations re-derived from the packs and "
              f"objects, {fixed.objects_fixed} content objects re-mapped, "
              f"{fixed.refcounts_fixed} reference counts corrected, {fixed.missing_chunks} "
              "chunks have no intact copy")
    with Store(args.store, readonly=True) as store:
        report = verify(store)
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"problem: {problem}")
    for path in report.damaged_files:
        print(f"damaged file: {path}")
    print(f"checked {report.records} records ({human_bytes(report.bytes_checked)})")
    if not report.ok:
        raise HubfsError(_damage_message(args.store, report, repaired=args.repair), 3)
    print("store is consistent")
    return 0


def _damage_message(store: Path, report: VerifyReport, repaired: bool) -> str:
    """One line: what verify found, and what ``--repair`` does (or did not) do about it."""
    found = (f"store {store} is damaged: {len(report.problems)} problems, "
             f"{len(report.damaged_files)} damaged files (listed above)")
    if not repaired:
        return (f"{found}: run `hubfs verify --repair {store}`, which rebuilds the index "
                "(from a snapshot and the packs) and re-points chunks to intact copies; bytes "
                "that no pack holds intact it cannot bring back")
    if report.index_problems:
        return (f"{found}: `hubfs verify --repair` found no snapshot that repairs the index; "
                "it raised reference counts so gc keeps every chunk: copy out what reads back "
                "and import it into a new store")
    return (f"{found}: their bytes are in no pack any more, which `hubfs verify --repair` "
            "cannot bring back; restore those files from their source and delete the damaged "
            "copies")


def cmd_mount(args: argparse.Namespace) -> int:
    import grp

    from .mount import mount
    from .policy import Policy, SharedTree

    shared = None
    if args.shared_group:
        try:
            gid = grp.getgrnam(args.shared_group).gr_gid
        except KeyError:
            raise HubfsError(f"no group named {args.shared_group!r}: create it with "
                             f"`groupadd {args.shared_group}` and add the users with "
                             f"`usermod -aG {args.shared_group} USER`", 2) from None
        shared = SharedTree(gid, args.shared_others)
    policy = Policy(homes=args.multi_user, shared=shared)
    if (args.multi_user or shared) and not args.allow_other:
        raise HubfsError("--multi-user and --shared-group serve other users: add --allow-other",
                         2)
    if args.ingest_step_mib < 1:
        raise HubfsError("--ingest-step-mib must be at least 1", 2)
    tune_malloc_for_daemon()  # before mount() forks the daemon: it inherits the settings
    mount(args.store, args.mountpoint, foreground=args.foreground,
          allow_other=args.allow_other, options=args.o, policy=policy,
          ingest_step_bytes=args.ingest_step_mib << 20, checked_reads=args.checked_reads,
          materialise_budget_bytes=int(args.materialise_budget_gib * (1 << 30)),
          cache_bytes=parse_cache_size(args.cache_size) if args.cache_size else None)
    return 0


# glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
DAEMON_MMAP_THRESHOLD_BYTES = 256 * 1024
DAEMON_ARENAS_MAX = 2


def tune_malloc_for_daemon() -> None:
    """Keep the daemon's RSS to what its caches and buffers account for.

    The daemon frees and reallocates 0.25-4 MiB buffers (decoded chunks, ingest windows) from
    many threads. With glibc's defaults they come from per-thread arenas (up to 8 per core),
    whose freed space is kept, not returned, and the dynamic mmap threshold climbs to 32 MiB
    after the first large free; measured under tests/test_load.py, RSS then runs 60-150 MiB
    over the design bound. A fixed threshold maps every buffer of 256 KiB or more on its own
    (returned to the kernel when freed), and two arenas bound what small allocations strand.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, DAEMON_MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_ARENA_MAX, DAEMON_ARENAS_MAX)
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        log.info("mallopt is not available; the daemon keeps the allocator's defaults")


def cmd_umount(args: argparse.Namespace) -> int:
    from .mount import umount

    umount(args.mountpoint)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from .mount import env_lines

    print("\n".join(env_lines(args.mountpoint)))
    return 0


def _ask_daemon(mountpoint: Path, command: str, store_kind: str = "a store") -> Any:
    """A control command's answer from the daemon serving ``mountpoint``."""
    from . import control
    from .mount import find_mount

    info = find_mount(mountpoint)
    if info is None:
        raise HubfsError(f"{mountpoint} is not a hubfs mount (see `mount -t fuse.hubfs`); "
                         f"mount {store_kind} there first", 2)
    return control.request(Path(info.source), command, lambda done, total: None)


def cmd_status(args: argparse.Namespace) -> int:
    report = _ask_daemon(args.mountpoint, "status")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    sizes = ("staged_bytes", "decoded_cache_bytes", "index_bytes", "free_bytes", "disk_bytes",
             "materialised_bytes", "materialise_budget_bytes")
    for key, value in report.items():
        if key in ("recent_errors", "requests"):
            continue
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if sub_key.endswith(("last_sync", "last_upload")) and sub_value:
                    sub_value = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sub_value))
                elif sub_key.endswith("_bytes") and isinstance(sub_value, int):
                    sub_value = human_bytes(sub_value)
                elif sub_key == "cache_limit_bytes" and sub_value is None:
                    sub_value = "unlimited"
                elif sub_key == "cache_hit_rate" and sub_value is not None:
                    sub_value = f"{sub_value:.1%}"
                print(f"{(key + ' ' + sub_key).replace('_', ' '):22} {sub_value}")
            continue
        shown = human_bytes(value) if key in sizes else value
        print(f"{key.replace('_', ' '):22} {shown}")
    print(f"{'requests served':22} {'count':>9} {'total s':>9} {'mean ms':>9} {'max ms':>9}")
    for op, times in report["requests"].items():
        print(f"  {op:20} {times['count']:9d} {times['total_s']:9.2f} {times['mean_ms']:9.3f} "
              f"{times['max_ms']:9.1f}")
    print(f"{'recent errors':22} {len(report['recent_errors']) or 'none'}")
    for line in report["recent_errors"]:
        print(f"  {line}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    report = _ask_daemon(args.mountpoint, "sync", "a cluster store")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"published {report['published_entries']} changes; pulled "
              f"{report['pulled_segments']} segments, {report['applied_paths']} names changed "
              f"here; {report['uploads_queued']} uploads queued")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from . import control, gc
    from .errors import StoreBusyError
    from .progress import Progress

    try:
        store = Store(args.store)
    except StoreBusyError:
        with Progress("gc (in the mount daemon)", 0) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.advance(done - bar.done)
            result = control.request(args.store, "gc-full" if args.full else "gc", progress)
    else:
        from .repair import snapshot

        with store:
            result = gc.collect(store, full=args.full).to_dict()
            snapshot(store.index, store.path)
    print(f"gc: dropped {result['chunks_dropped']} unreferenced chunks, rewrote "
          f"{result['packs_rewritten']} packs, deleted {result['packs_deleted']}; packs "
          f"{human_bytes(result['bytes_before'])} -> {human_bytes(result['bytes_after'])}")
    if result["damaged_packs"]:
        raise HubfsError(f"{result['damaged_packs']} packs hold damaged data and were kept: "
                         f"run `hubfs verify --repair {args.store}` to re-point their chunks "
                         "to intact copies and list the files it cannot restore", 3)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import benchmark

    if args.plot is not None:
        benchmark.check_plot_available()  # before minutes of measuring, not after
    if args.repeats < 1 or args.random_reads < 0:
        raise HubfsError("--repeats must be at least 1 and --random-reads at least 0", 2)
    result = benchmark.run_bench(args.paths or [Path.cwd()], repeats=args.repeats,
                                 random_reads=args.random_reads, workdir=args.workdir,
                                 whole_cache=not args.evict_only)
    print(benchmark.format_table(result))
    if args.json is not None:
        benchmark.write_json(result, args.json)
        print(f"results: {args.json}")
    if args.plot is not None:
        benchmark.write_plot(result, args.plot)
        print(f"plot: {args.plot}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from . import prune
    from .progress import Progress

    top: Path = args.mountpoint
    if not top.is_dir():
        raise HubfsError(f"{top} is not a directory: name a hubfs mount (or a cache directory "
                         "inside one)", 2)
    unused_for_s = prune.parse_duration_s(args.unused_for) if args.unused_for else None
    keep_bytes = prune.parse_size_bytes(args.keep_size) if args.keep_size else None
    now = prune.now_s()
    entries = prune.scan(top)
    chosen = prune.select(entries, now_s=now, unused_for_s=unused_for_s, keep_bytes=keep_bytes)
    plan = prune.plan_removals(entries, chosen)
    verb = "would remove" if args.dry_run else "removing"
    for entry in sorted(plan.entries, key=lambda e: e.last_used_s):
        print(f"{verb} {entry.library} {entry.kind} {entry.name} "
              f"({human_bytes(entry.size)}, {prune.user_name(entry.uid)}, last used "
              f"{prune.age(now - entry.last_used_s)} ago)")
    rows = prune.summary(plan, entries, top)
    if not rows:
        print(f"no Hugging Face, torch.hub, TF Hub or datasets cache under {top}")
        return 0
    width = max(len("cache"), *(len(r.cache) for r in rows))
    print(f"\n{'cache':{width}s} {'library':12s} {'user':10s} {'remove':>6s} {'keep':>6s} "
          f"{'frees':>10s}")
    for r in rows:
        print(f"{r.cache:{width}s} {r.library:12s} {r.user:10s} {r.removed:6d} {r.kept:6d} "
              f"{human_bytes(r.frees_bytes):>10s}")
    total = f"{len(plan.entries)} of {len(entries)} entries, {human_bytes(plan.frees_bytes)}"
    if args.dry_run:
        print(f"dry run: would remove {total}; nothing was changed")
        return 0
    for trash in prune.stale_trash(top):  # left by an interrupted prune
        shutil.rmtree(trash, ignore_errors=True)
    with Progress("pruning", plan.frees_bytes) as bar:
        prune.execute(plan, bar.advance)
    from .mount import mounts

    store = next((m.source for m in mounts() if m.mountpoint == Path(os.path.abspath(top))
                  or m.mountpoint in Path(os.path.abspath(top)).parents), None)
    after = f"`hubfs gc {store}`" if store else "`hubfs gc STORE`"
    print(f"removed {total}; {after} gives the space back to the disk")
    return 0


DESCRIPTION = """\
hubfs keeps the model caches of every user on a machine (Hugging Face, torch.hub, TF Hub,
anything in ~/.cache) in one deduplicated store, mounted with FUSE: identical files are stored
once, whoever downloaded them, and the libraries use the mount unmodified.
"""

EPILOG = """\
start here:
  hubfs init ~/hubfs-store              # once: an empty store (outside the mount)
  hubfs mount ~/hubfs-store ~/.cache    # returns once mounted
  eval "$(hubfs env ~/.cache)"          # point HF, torch.hub and TF Hub at it

`hubfs COMMAND --help` tells what each command is for, with an example.
"""


def _command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str,
             purpose: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it is for and shows one example."""
    return sub.add_parser(name, help=summary, description=purpose,
                          epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hubfs", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "init", "create an empty store",
                 "Create an empty store in a new directory. Keep it outside the directory you "
                 "will mount it on;\nhow chunks are compressed is chosen here, once.",
                 "hubfs init /var/lib/hubfs/store")
    p.add_argument("store", type=Path)
    p.add_argument("--compression", default="auto", choices=["auto", "raw", "max"],
                   help="auto: compress chunks only where it saves >=20%% (default)")
    p.add_argument("--remote", metavar="s3://BUCKET/PREFIX",
                   help="make the store one node of a cluster store in this S3-compatible "
                   "bucket (endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                   "AWS_SECRET_ACCESS_KEY, AWS_REGION or the AWS config files)")
    p.add_argument("--node", help="this node's name in the cluster (default: the host name; "
                   "unique per node)")
    p.add_argument("--cache-size", metavar="SIZE",
                   help="with --remote: keep at most this much in the store's packs and objects "
                   "(e.g. 500G, 200GiB), evicting the least recently used data the bucket holds "
                   "(default: unlimited)")
    p.set_defaults(func=cmd_init)

    p = _command(sub, "import", "copy a directory tree into the store",
                 "Copy an existing directory (a ~/.cache, a Hugging Face hub cache, a torch hub "
                 "directory) into the store,\nkeeping symlinks, hard links, modes, owners and "
                 "times; bytes already stored are not stored again.",
                 "hubfs import ~/hubfs-store ~/.cache/huggingface --dest /huggingface")
    p.add_argument("store", type=Path)
    p.add_argument("src", type=Path)
    p.add_argument("--dest", default="/", help="path inside the store (default /)")
    p.set_defaults(func=cmd_import)

    p = _command(sub, "export", "write a tree of the store back out",
                 "Write a stored directory (or the whole store) back to an ordinary directory, "
                 "byte for byte.", "hubfs export ~/hubfs-store /huggingface ~/hf-copy")
    p.add_argument("store", type=Path)
    p.add_argument("path")
    p.add_argument("dest", type=Path)
    p.set_defaults(func=cmd_export)

    p = _command(sub, "ls", "list a directory of the store",
                 "List a directory of the store without mounting it (works while mounted too).",
                 "hubfs ls ~/hubfs-store /huggingface/hub")
    p.add_argument("store", type=Path)
    p.add_argument("path", nargs="?", default="/")
    p.set_defaults(func=cmd_ls)

    p = _command(sub, "cat", "write a stored file to stdout",
                 "Write one stored file to stdout without mounting (works while mounted too).",
                 "hubfs cat ~/hubfs-store /huggingface/token > token")
    p.add_argument("store", type=Path)
    p.add_argument("path")
    p.set_defaults(func=cmd_cat)

    p = _command(sub, "stats", "sizes, dedup and compression figures",
                 "How much the store holds, how much is on disk, and what dedup and compression "
                 "saved, per tree.", "hubfs stats ~/hubfs-store")
    p.add_argument("store", type=Path)
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    p.set_defaults(func=cmd_stats)

    p = _command(sub, "verify", "check every byte and the whole index",
                 "Re-read every stored byte and check the index; names damaged files and exits "
                 "3 if anything is wrong.", "hubfs verify ~/hubfs-store")
    p.add_argument("store", type=Path)
    p.add_argument("--repair", action="store_true",
                   help="first rebuild a damaged index from its newest good snapshot and the "
                   "stored data itself (the store must be unmounted)")
    p.set_defaults(func=cmd_verify)

    p = _command(sub, "gc", "give back the space of data no file uses (works mounted)",
                 "Give back the disk space of data that no file uses any more (after deleting "
                 "models).\nSafe to interrupt; while mounted it runs inside the mount, readers "
                 "keep working.", "hubfs gc ~/hubfs-store")
    p.add_argument("store", type=Path)
    p.add_argument("--full", action="store_true",
                   help="give back every unused byte, rewriting more data (slower); by default "
                   "only pack files at least 20%% unused are rewritten")
    p.set_defaults(func=cmd_gc)

    p = _command(sub, "mount", "mount the store (returns once mounted)",
                 "Mount the store on a directory, usually your cache directory; returns once "
                 "mounted and logs to STORE/hubfs.log.\nFor one store shared by a machine's "
                 "users, run it as root with --allow-other --multi-user.",
                 "hubfs mount ~/hubfs-store ~/.cache")
    p.add_argument("store", type=Path)
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--foreground", "-f", action="store_true",
                   help="serve in this process, logging to stderr")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users in (permissions are still enforced)")
    p.add_argument("-o", action="append", default=[], help="extra FUSE mount options")
    p.add_argument("--multi-user", action="store_true",
                   help="serve home/<user> private trees, made on each user's first use")
    p.add_argument("--shared-group", metavar="GROUP",
                   help="serve shared/, where every member of GROUP reads and updates "
                   "everything whatever their umask")
    p.add_argument("--shared-others", choices=["none", "read"], default="none",
                   help="what non-members get in shared/ (default: none)")
    p.add_argument("--checked-reads", action="store_true",
                   help="the daemon serves and checks every read, and receives every write "
                   "(FUSE passthrough, which lets the kernel read large files from the store "
                   "and write new files at disk speed, bypasses hubfs's checksums)")
    p.add_argument("--materialise-budget-gib", type=float, default=8.0,
                   help="disk room for copies of large files stored as references to other "
                   "files' chunks, made when one is opened so the kernel can serve it "
                   "(default 8; 0 turns them off)")
    p.add_argument("--cache-size", metavar="SIZE",
                   help="a cluster store: keep at most this much in the store's packs and "
                   "objects (e.g. 500G, 200GiB, or unlimited), evicting the least recently used "
                   "data the bucket holds; recorded in the store for later mounts (default: as "
                   "recorded; unlimited)")
    p.add_argument("--ingest-step-mib", type=int, default=64,
                   help="store a file being written every this many MiB, so a download never "
                   "needs two full copies on disk (default 64)")
    p.set_defaults(func=cmd_mount)

    p = _command(sub, "umount", "store everything, unmount, wait for the daemon",
                 "Unmount: everything written is stored first; says so if files are still "
                 "open.", "hubfs umount ~/.cache")
    p.add_argument("mountpoint", type=Path)
    p.set_defaults(func=cmd_umount)

    p = _command(sub, "status", "how a running mount is doing",
                 "Ask a mount's daemon how it is doing: its pid and uptime, whether reads are "
                 "served by the\nkernel (passthrough) or the daemon and why, open files, files "
                 "still being stored, cache\nsizes, the last index snapshot, recent errors and "
                 "the store disk's free space.", "hubfs status ~/.cache --json")
    p.add_argument("mountpoint", type=Path, metavar="MNT", help="a hubfs mount point")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_status)

    p = _command(sub, "sync", "publish and pull a cluster store's changes now",
                 "Publish this node's changes (and wait until the object store has them), then "
                 "pull the other\nnodes' changes. Without it, changes propagate every few "
                 "seconds.", "hubfs sync ~/.cache")
    p.add_argument("mountpoint", type=Path, metavar="MNT", help="a mount of a cluster store")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_sync)

    p = _command(sub, "env", "print the exports that put the ML caches in a mount",
                 "Print the shell exports (XDG_CACHE_HOME, HF_HOME, TORCH_HOME, "
                 "TFHUB_CACHE_DIR) that put the ML\nlibraries' caches in the mount; in a "
                 "multi-user mount, in your own tree.", 'eval "$(hubfs env ~/.cache)"')
    p.add_argument("mountpoint", type=Path)
    p.set_defaults(func=cmd_env)

    p = _command(sub, "bench", "read speed through the mount against the same files on disk",
                 "Measure how fast files read through a hubfs mount, against a native copy of "
                 "the same files on the\nstore's disk (made first, after a free-space check, "
                 "and removed afterwards): sequential reads\ncold and hot, random 4 KiB reads, "
                 "and model load times (safetensors, torch.load with mmap).\nCold runs drop "
                 "the page cache (as root) or evict the measured files (otherwise, and said "
                 "so).\nPrints a table of ratios: hubfs speed / native speed, 1.00 = as fast.",
                 "hubfs bench ~/.cache/huggingface/hub/models--org--model --json b.json "
                 "--plot b.png")
    p.add_argument("paths", type=Path, nargs="*", metavar="PATH",
                   help="files or directories inside a hubfs mount (default: the current "
                   "directory); symlinks are followed")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each measurement, native and hubfs alternating (default 3)")
    p.add_argument("--random-reads", type=int, default=2000,
                   help="4 KiB reads in the random-read measurement (default 2000)")
    p.add_argument("--workdir", type=Path,
                   help="where the native copy goes (default: the store's parent directory)")
    p.add_argument("--evict-only", action="store_true",
                   help="even as root, evict only the measured files (posix_fadvise) instead "
                   "of dropping the whole page cache")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="draw the figures (needs matplotlib: pip install 'hubfs[bench]')")
    p.set_defaults(func=cmd_bench)

    p = _command(sub, "prune", "remove cache entries not used for a while",
                 "Remove whole cache entries the libraries can lose without harm (they download "
                 "them again when asked):\na Hugging Face revision (snapshot, refs, blobs no "
                 "other revision uses), a torch.hub checkpoint or repo,\na TF Hub module, a "
                 "datasets download or prepared dataset. Chosen by last use (file access "
                 "times);\nshows what it frees per cache and user. Run `hubfs gc` afterwards "
                 "to give the space back to the disk.",
                 "hubfs prune ~/.cache --unused-for 30d --dry-run")
    p.add_argument("mountpoint", type=Path, metavar="MNT",
                   help="a hubfs mount, or a directory inside one (any directory works)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--unused-for", metavar="AGE",
                       help="remove entries not used for AGE: 30d, 12h, 2w")
    which.add_argument("--keep-size", metavar="SIZE",
                       help="keep the most recently used entries up to SIZE (500G, 200GiB), "
                       "remove the rest")
    p.add_argument("--dry-run", "-n", action="store_true",
                   help="show what would be removed, change nothing")
    p.set_defaults(func=cmd_prune)
    return parser


# Commands that never read a store's index in this process (mount forks its own daemon).
UNGUARDED_COMMANDS = ("init", "mount", "umount", "env")
CRASH_SIGNALS = (signal.SIGBUS, signal.SIGSEGV)
PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # file names are bytes: print them back as bytes
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="surrogateescape")
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in UNGUARDED_COMMANDS:
        return run(args)
    return run_guarded(args)


def run_guarded(args: argparse.Namespace) -> int:
    """``run`` in a child; a child killed by SIGBUS/SIGSEGV becomes one line naming the fix."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _die_with_parent()
            code = run(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # a bug: show it (os._exit below would swallow it)
            traceback.print_exc()
            raise
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except BrokenPipeError:
                pass
            os._exit(code)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the child's to report
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGINT, previous)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    sig = os.WTERMSIG(status)
    if sig in CRASH_SIGNALS:
        store = getattr(args, "store", "STORE")
        print(f"hubfs: error: reading the store {store} crashed ({signal.Signals(sig).name}), "
              "which a damaged index causes (a page pointing past the end of "
              f"index/data.mdb): run `hubfs verify --repair {store}`", file=sys.stderr)
        return 3
    return 128 + sig


def _die_with_parent() -> None:
    """A child whose parent was killed (a timeout) must not run on alone."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except HubfsError as exc:
        print(f"hubfs: error: {exc.message}", file=sys.stderr)
        return exc.exitcode
    except FsError as exc:  # names were resolved before: the index contradicts itself
        store = getattr(args, "store", "STORE")
        print(f"hubfs: error: the index of {store} is inconsistent ({exc}): run "
              f"`hubfs verify --repair {store}`", file=sys.stderr)
        return 3
    except OSError as exc:  # the user's disk or files said no: name what and where
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"hubfs: error: {exc.strerror or exc}{where}: check that path and its "
              "permissions, and the free space on its disk", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hubfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
