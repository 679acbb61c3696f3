"""Contents for the cluster tests: bytes on disk cut into fixed-size chunks.

The remote does not care how a content was cut, only that its id is ``content_id`` of its size
and chunk ids and that every chunk matches its BLAKE3 id; fixed-size cuts keep tests readable.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3

from hubfs.contents import content_id
from hubfs.upload_queue import ContentSource

CHUNK_BYTES = 1 << 20


def table_of(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> tuple[bytes, tuple[int, ...],
                                                                   tuple[bytes, ...]]:
    lengths = tuple(min(chunk_bytes, len(data) - p) for p in range(0, len(data), chunk_bytes))
    ids, pos = [], 0
    for n in lengths:
        ids.append(blake3.blake3(data[pos:pos + n]).digest())
        pos += n
    return content_id(len(data), ids), lengths, tuple(ids)


class FileContents:
    """A stand-in for the local store: contents kept as files named by id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.tables: dict[bytes, tuple[tuple[int, ...], tuple[bytes, ...]]] = {}

    def add(self, data: bytes, chunk_bytes: int = CHUNK_BYTES) -> bytes:
        cid, lengths, ids = table_of(data, chunk_bytes)
        (self.root / cid.hex()).write_bytes(data)
        self.tables[cid] = (lengths, ids)
        return cid

    def add_random(self, size: int) -> bytes:
        return self.add(os.urandom(size))

    def path(self, cid: bytes) -> Path:
        return self.root / cid.hex()

    def source(self, cid: bytes) -> ContentSource | None:
        if cid not in self.tables or not self.path(cid).exists():
            return None
        lengths, ids = self.tables[cid]
        return ContentSource(lengths, ids, lambda: open(self.path(cid), "rb"))

    def load(self, chunk_bytes: int = CHUNK_BYTES) -> list[bytes]:
        """Index the files already in ``root`` (another process wrote them)."""
        for f in sorted(self.root.iterdir()):
            cid, lengths, ids = table_of(f.read_bytes(), chunk_bytes)
            assert cid.hex() == f.name
            self.tables[cid] = (lengths, ids)
        return list(self.tables)
