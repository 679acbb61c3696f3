"""A real TF Hub module (SavedModel in a ``.tar.gz``) and snippets for the real tensorflow_hub.

TensorFlow lives in its own venv (``HUBFS_TF_PYTHON``, default ``<repo>/.venv-tf/bin/python``):
it is large, and its numpy/protobuf pins must not constrain the torch venv. So the SavedModel is
built by a subprocess in that venv, and packed into the archive here with stdlib ``tarfile``.

How tensorflow_hub 0.16 resolves an ``http://`` handle (``resolver.py``,
``compressed_module_resolver.py``): with ``TFHUB_MODEL_LOAD_FORMAT`` unset (AUTO) every http(s)
handle goes to ``HttpCompressedFileResolver``, whatever its path looks like. It appends
``tf-hub-format=compressed`` to the query (again, if the handle already has it) and GETs that URL
with urllib, following redirects; the body is read as a streamed tar (``tarfile.open(mode="r|*")``,
so gzip or plain) whose members are the SavedModel's files relative to the module root — only
regular files and directories are accepted. FileServer ignores the query, so serving the archive
at the handle's path is all the server needs to do. No Content-Length or Range is used.

What it writes under ``$TFHUB_CACHE_DIR`` (``module = sha1(handle as given).hexdigest()``):
``<module>.lock`` (created as ``<module>.lock.tmp<uuid>`` then renamed without overwrite),
``<module>.<uuid>.tmp/`` (extracted into), ``<module>.descriptor.txt`` (via
``.descriptor.txt.tmp<uuid>`` + rename), then the rename ``<module>.<uuid>.tmp`` -> ``<module>``
and removal of the lock. A module directory that exists and is non-empty is a cache hit.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import tarfile
from pathlib import Path

from .run import RESULT_PREFIX, run_client

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
TF_PYTHON_ENV = "HUBFS_TF_PYTHON"
# Quiets TensorFlow's C++ INFO/WARNING chatter so a failing client's stderr stays readable.
TF_QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
BUILD_TIMEOUT_S = 180.0

# The module computes y = x @ W + b for x of shape [batch, 3].
WEIGHTS = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
BIAS = [0.5, -0.5]


def tf_python() -> Path:
    """The TensorFlow venv's interpreter (may not exist: callers skip on that)."""
    configured = os.environ.get(TF_PYTHON_ENV)
    return Path(configured) if configured else REPO_ROOT / ".venv-tf" / "bin" / "python"


def expected_output(x: list[list[float]]) -> list[list[float]]:
    """What the module returns for ``x``, computed without TensorFlow."""
    return [
        [sum(row[i] * WEIGHTS[i][j] for i in range(len(row))) + BIAS[j] for j in range(len(BIAS))]
        for row in x
    ]


def module_dir_name(handle: str) -> str:
    """The cache directory TF Hub uses for ``handle``: sha1 of the handle exactly as given."""
    return hashlib.sha1(handle.encode("utf8")).hexdigest()


_BUILD_CODE = """
import tensorflow as tf

class Affine(tf.Module):
    def __init__(self):
        super().__init__()
        self.w = tf.Variable({weights!r}, dtype=tf.float32, name="w")
        self.b = tf.Variable({bias!r}, dtype=tf.float32, name="b")

    @tf.function(input_signature=[tf.TensorSpec([None, {n_in}], tf.float32)])
    def __call__(self, x):
        return tf.matmul(x, self.w) + self.b

module = Affine()
tf.saved_model.save(module, {out!r}, signatures={{"serving_default": module.__call__}})
"""


def build_saved_model(python: Path | str, out_dir: Path) -> Path:
    """Write a real SavedModel of the affine module to ``out_dir`` using TensorFlow."""
    code = _BUILD_CODE.format(weights=WEIGHTS, bias=BIAS, n_in=len(WEIGHTS), out=str(out_dir))
    run_client(str(python), code, dict(TF_QUIET_ENV), BUILD_TIMEOUT_S)
    if not (out_dir / "saved_model.pb").is_file():
        raise RuntimeError(f"no saved_model.pb in {out_dir}")
    return out_dir


def pack_module(model_dir: Path) -> bytes:
    """Pack a SavedModel directory as TF Hub's compressed format: a gzip'd tar of its contents.

    Members are relative to the module root (``./saved_model.pb``, ``./variables/...``), as
    ``tar -czf m.tar.gz -C model_dir .`` would write. Sorted names and zeroed times and owners
    make the bytes depend on the files alone.
    """

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(str(model_dir), arcname=".", recursive=False, filter=normalise)
        for path in sorted(model_dir.rglob("*")):
            rel = "./" + path.relative_to(model_dir).as_posix()
            tar.add(str(path), arcname=rel, recursive=False, filter=normalise)
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def make_module_tarball(python: Path | str, work_dir: Path) -> bytes:
    """Build the SavedModel under ``work_dir`` and return the ``.tar.gz`` bytes."""
    model_dir = build_saved_model(python, work_dir / "affine_savedmodel")
    return pack_module(model_dir)


# -- client snippet: prints one RESULT line (see run.client_result) ---------------------------

_LOAD_CODE = """
import json, os
import tensorflow as tf
import tensorflow_hub as hub

def resolve_and_load(handle):
    path = hub.resolve(handle)
    module = hub.load(handle)
    x = tf.constant({x!r}, dtype=tf.float32)
    return {{
        "path": path,
        "files": sorted(
            os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
        ),
        "output": module(x).numpy().tolist(),
        "signature": module.signatures["serving_default"](x=x)["output_0"].numpy().tolist(),
    }}

print({prefix!r} + json.dumps([resolve_and_load(h) for h in {handles!r}]), flush=True)
"""


def resolve_and_load_code(handles: list[str], x: list[list[float]]) -> str:
    """``hub.resolve`` then ``hub.load`` of each handle, in one process (TF's import takes
    seconds); calls each module and its signature. Emits one result per handle."""
    return _LOAD_CODE.format(handles=handles, x=x, prefix=RESULT_PREFIX)
