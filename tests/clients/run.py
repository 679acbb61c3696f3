"""Run a real hub client's code in a subprocess, against a cache root chosen by the test.

Clients run out of process for three reasons: torch and TensorFlow live in different
interpreters (TensorFlow has its own venv), each client reads its cache location from the
environment once at import time, and the same snippet must later run unchanged against a hubfs
mount instead of a temp dir — so the cache root is just a parameter of ``client_env``.

A snippet reports structured results by printing one ``RESULT_PREFIX + json`` line, which
``client_result`` picks out of whatever else the client printed.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import subprocess
import tempfile
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULT_PREFIX = "HUBFS-RESULT "

# Inherited settings that would move a client's cache away from the root under test.
_CACHE_ENV_VARS = (
    "XDG_CACHE_HOME",
    "TORCH_HOME",
    "TFHUB_CACHE_DIR",
    "TFHUB_MODEL_LOAD_FORMAT",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "HF_DATASETS_CACHE",
    # Not a cache location, but it switches off a write path the clients have by default:
    # importing hubconf.py from torch's cache writes __pycache__/*.pyc there (temp + rename).
    "PYTHONDONTWRITEBYTECODE",
)


class ClientError(RuntimeError):
    """A client snippet exited non-zero or timed out; carries its output for the test report."""

    def __init__(self, message: str, stdout: str, stderr: str) -> None:
        super().__init__(f"{message}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}")
        self.stdout = stdout
        self.stderr = stderr


def client_env(cache_root: Path | str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment that puts every client's cache under ``cache_root``, as ``~/.cache`` would be.

    torch.hub and huggingface_hub derive their defaults from ``XDG_CACHE_HOME``
    (``<root>/torch/hub``, ``<root>/huggingface``), so those are left to their defaults.
    TF Hub's default is ``$TMPDIR/tfhub_modules``, not under XDG, so it is set explicitly.
    """
    root = Path(cache_root)
    env = {
        "XDG_CACHE_HOME": str(root),
        "TFHUB_CACHE_DIR": str(root / "tfhub_modules"),
    }
    env.update(extra or {})
    return env


def run_client(
    python: str,
    code: str,
    env: dict[str, str],
    timeout: float,
    *,
    cwd: Path | str | None = None,
    user: str | None = None,
    umask: int | None = None,
) -> str:
    """Run ``code`` with interpreter ``python``; return its stdout, raise ClientError on failure.

    With ``user`` the client runs as that user (``setpriv``, with their groups and HOME), to test
    what other users of a shared machine see; ``umask`` is the client's umask.

    ``env`` is laid over this process's environment with cache-location variables removed, so a
    developer's own settings cannot leak a client's writes out of the cache root under test.
    The snippet runs in a neutral directory so nothing in the repo shadows its imports.
    """
    full_env = {k: v for k, v in os.environ.items() if k not in _CACHE_ENV_VARS}
    # Loopback must never go through a proxy, whatever the machine has configured.
    full_env["NO_PROXY"] = full_env["no_proxy"] = "127.0.0.1,localhost"
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env)
    source = textwrap.dedent(code)
    argv = [python, "-c", source]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]
        full_env["HOME"] = pwd.getpwnam(user).pw_dir
        full_env["USER"] = full_env["LOGNAME"] = user
    log.debug("running client with %s (timeout %.0f s)", python, timeout)
    try:
        proc = subprocess.run(
            argv,
            umask=-1 if umask is None else umask,
            env=full_env,
            cwd=str(cwd) if cwd is not None else tempfile.gettempdir(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise ClientError(
            f"client timed out after {timeout} s", _text(e.stdout), _text(e.stderr)
        ) from None
    if proc.returncode != 0:
        raise ClientError(f"client exited with {proc.returncode}", proc.stdout, proc.stderr)
    return proc.stdout


def client_result(stdout: str) -> Any:
    """The JSON value of the last ``RESULT_PREFIX`` line a snippet printed."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise ValueError(f"no {RESULT_PREFIX.strip()} line in client output:\n{stdout}")


def _text(output: str | bytes | None) -> str:
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output
