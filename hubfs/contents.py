"""File contents: their ids, their chunk tables, and the reference counts that keep them.

A content id is BLAKE3-256 over a domain tag, the file size and the ordered chunk ids. Chunk
ids are BLAKE3 of the chunk bytes, so the content id is as collision resistant as BLAKE3 itself
and costs no second pass over the data; it depends on the store's chunking parameters, which
are fixed per store. Content ids never appear as paths: a user reaches bytes only through an
inode they may open.

References: ``content_refs`` counts inodes holding a content; a chunk's ``refcount`` counts its
occurrences in content tables. A chunk at zero stays in its pack (a later write of the same
bytes revives it for free) until ``gc`` reclaims it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import blake3

from .errors import IntegrityError
from .index import ChunkEntry, ContentTable, Txn
from .objects import worth_an_object
from .packs import ChunkLocation

log = logging.getLogger(__name__)

CONTENT_ID_TAG = b"hubfs-content-v1\0"


def content_id(size: int, chunk_ids: tuple[bytes, ...] | list[bytes]) -> bytes:
    hasher = blake3.blake3(CONTENT_ID_TAG + size.to_bytes(8, "little"))
    for cid in chunk_ids:
        hasher.update(cid)
    return hasher.digest()


@dataclass(frozen=True)
class PreparedContent:
    """Content whose new chunks are appended to packs but not yet known to the index."""

    content_id: bytes
    table: ContentTable
    new_chunks: dict[bytes, ChunkLocation] = field(default_factory=dict)
    new_stored_bytes: int = 0
    object_id: int = 0  # the content's bytes become this object (hubfs.objects), if not 0


EMPTY = PreparedContent(content_id(0, ()), ContentTable(0, (), ()))


def empty_content(txn: Txn) -> tuple[bytes, int]:
    """The empty file's content, registered if this is its first use."""
    if txn.content(EMPTY.content_id) is None:
        txn.put_content(EMPTY.content_id, EMPTY.table)
    return EMPTY.content_id, 0


def register(txn: Txn, prepared: PreparedContent) -> bool:
    """Make prepared content known to the index; its packs must already be synced. Returns
    whether the prepared object is now the content's: the caller puts the file in place
    before the transaction commits (else the object is not needed, and not named).

    The new content starts with no reference: ``add_ref`` (through the namespace) gives it one.
    With an object (hubfs.objects), chunks whose copy is in a pack or that no file holds move
    into the object, so the store keeps one copy (gc reclaims the other); a content stored
    before without an object gets it now. A twin (the same bytes stored meanwhile with an object) wins.
    """
    if prepared.object_id and txn.object_of(prepared.content_id) is not None:
        prepared = replace(prepared, object_id=0, new_chunks={})
    if prepared.object_id:
        txn.put_object(prepared.content_id, prepared.object_id)
    known = txn.content(prepared.content_id) is not None
    if known and not prepared.object_id:
        return False
    for chunk_id in dict.fromkeys(prepared.table.chunk_ids) if known else prepared.table.chunk_ids:
        entry = txn.chunk(chunk_id)
        loc = prepared.new_chunks.get(chunk_id)
        if entry is None:
            if loc is None:
                raise IntegrityError(
                    f"chunk {chunk_id.hex()[:16]} vanished from the index while a file was being "
                    "stored (was `hubfs gc` run at the same time?); write the file again",
                    chunk_id)
            entry = ChunkEntry(loc, 0)
        elif loc is not None and entry.location.remote:
            entry = ChunkEntry(loc, entry.refcount)  # now held here (hubfs.cluster)
        elif prepared.object_id and loc is not None and (not entry.location.in_object
                                                         or not entry.refcount):
            entry = ChunkEntry(loc, entry.refcount)  # a pack's copy, or one no file holds
        txn.put_chunk(chunk_id, ChunkEntry(entry.location, entry.refcount + (not known)))
    if not known:
        txn.put_content(prepared.content_id, prepared.table)
    return bool(prepared.object_id)


def held_by_a_file(entry: ChunkEntry | None) -> bool:
    """Whether a chunk's bytes are here and some file holds them: what a new content does
    not add to the store (the rest counts as new when deciding on an object)."""
    return entry is not None and not entry.location.remote and entry.refcount > 0


def object_still_worth_it(txn: Txn, prepared: PreparedContent) -> bool:
    """Whether a content prepared as an object still qualifies now that its transaction is
    open: files committed meanwhile (near-identical ones written at the same time) may hold
    most of its chunks already, and then it should be references to them."""
    known = txn.content(prepared.content_id) is not None
    new_bytes = 0
    for chunk_id, length in dict(zip(prepared.table.chunk_ids, prepared.table.lengths)).items():
        if not held_by_a_file(txn.chunk(chunk_id)):
            new_bytes += length
    return worth_an_object(prepared.table.size, new_bytes, known)


def register_chunks(txn: Txn, chunks: dict[bytes, ChunkLocation]) -> None:
    """Index chunks that no content holds yet (a file's front, ingested while it is still
    being written); they start at refcount 0 and must be pinned against gc by the caller."""
    for chunk_id, loc in chunks.items():
        entry = txn.chunk(chunk_id)
        if entry is None:
            txn.put_chunk(chunk_id, ChunkEntry(loc, 0))
        elif entry.location.remote:  # a cluster node's chunk, now held here
            txn.put_chunk(chunk_id, ChunkEntry(loc, entry.refcount))


def add_ref(txn: Txn, cid: bytes) -> None:
    if txn.content(cid) is None:
        raise IntegrityError(f"content {cid.hex()[:16]} is not in the index", None)
    txn.put_content_refs(cid, txn.content_refs(cid) + 1)


def drop_ref(txn: Txn, cid: bytes) -> None:
    """One holder less; the last one takes the content and its chunk references with it."""
    refs = txn.content_refs(cid)
    if refs > 1:
        txn.put_content_refs(cid, refs - 1)
        return
    table = txn.content(cid)
    txn.delete_content(cid)
    object_id = txn.object_of(cid)
    if object_id is not None:  # the file goes at the next gc, once no chunk needs it
        txn.delete_object(cid)
        txn.delete_materialised(object_id)
    if table is None:
        return
    for chunk_id in table.chunk_ids:
        entry = txn.chunk(chunk_id)
        if entry is not None and entry.refcount > 0:
            txn.put_chunk(chunk_id, ChunkEntry(entry.location, entry.refcount - 1))
