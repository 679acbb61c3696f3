"""Test artefacts and client snippets for driving the real ``torch.hub`` against FileServer.

Two artefacts, both real: a ``torch.save`` checkpoint named ``<stem>-<sha256 prefix>.pth`` so
``load_state_dict_from_url(check_hash=True)`` verifies it, and a hubconf repo zip laid out like
a GitHub zipball (one top-level ``<owner>-<repo>-<sha7>/`` directory, explicit directory
entries, the commit id as the zip comment).

How ``torch.hub.load(source='github')`` is pointed at 127.0.0.1 (torch 2.x ``torch/hub.py``):
the archive URL is built in exactly one place, ``torch.hub._git_archive_link(owner, repo,
ref)``, which ``_get_cache_or_reload`` looks up as a module global at call time. The client
snippet rebinds that one function to return ``http://127.0.0.1:PORT/<owner>/<repo>/zipball/
<ref>``; everything after it is torch's own code: ``download_url_to_file`` into
``hub/<ref>.zip.<uuid>.partial`` then ``shutil.move`` to ``hub/<ref>.zip``, extraction to
``hub/<owner>-<repo>-<sha7>/``, removal of the zip, ``shutil.move`` of the extracted directory
to ``hub/<owner>_<repo>_<ref>/``, the ``trusted_list`` append, and the hubconf import (which
writes ``__pycache__`` into the cached repo). The other github.com traffic is switched off by
ordinary arguments rather than patches:
- an explicit ``owner/repo:ref`` — without it ``_parse_repo_info`` probes
  ``https://github.com/<owner>/<repo>/tree/main/`` to choose between main and master;
- ``skip_validation=True`` — otherwise ``_validate_not_a_forked_repo`` pages through
  ``api.github.com`` branches and tags;
- ``trust_repo=True`` — otherwise an unknown owner gets an ``input()`` prompt.
Rejected alternatives: an HTTPS proxy needs a TLS man-in-the-middle and a CA injected into the
client; patching ``urlopen`` reaches further than needed; ``source='local'`` skips the whole
download/extract/rename path that hubfs must carry.

Checkpoint downloads need no redirection: ``download_url_to_file`` and
``load_state_dict_from_url`` take any URL.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from dataclasses import dataclass

from .run import RESULT_PREFIX

log = logging.getLogger(__name__)

# Fixed zip timestamps so the same repo always packs to the same bytes (dedup tests rely on it).
_ZIP_DATE_TIME = (2024, 1, 1, 0, 0, 0)
# torch.hub.HASH_REGEX is r"-([a-f0-9]*)\." and takes the first match in the file name.
CHECKPOINT_HASH_CHARS = 10
IN_FEATURES = 4
OUT_FEATURES = 3


@dataclass(frozen=True)
class Checkpoint:
    """A torch.save'd state dict of ``TinyNet`` (keys ``fc.weight``, ``fc.bias``)."""

    file_name: str  # "<stem>-<sha256[:10]>.pth", what torch.hub caches it as
    data: bytes
    sha256: str
    value_sum: float  # sum over all tensors: lets a client prove it loaded these bytes


def make_checkpoint(stem: str = "tinynet", extra_numel: int = 0) -> Checkpoint:
    """A real checkpoint; ``extra_numel`` adds an ``extra`` float32 tensor to make it bigger.

    With ``extra_numel`` the state dict no longer loads strictly into ``TinyNet``; use it for
    plain download / mmap tests.
    """
    import torch  # only the test process and torch clients have torch

    if "-" in stem or "." in stem:
        raise ValueError(f"stem {stem!r} must not contain '-' or '.' (torch's HASH_REGEX)")
    n = OUT_FEATURES * IN_FEATURES
    state = {
        "fc.weight": torch.arange(n, dtype=torch.float32).reshape(OUT_FEATURES, IN_FEATURES),
        "fc.bias": torch.tensor([0.5, -0.5, 1.0]),
    }
    if extra_numel:
        state["extra"] = torch.arange(extra_numel, dtype=torch.float32) / extra_numel
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    value_sum = float(sum(t.double().sum().item() for t in state.values()))
    return Checkpoint(f"{stem}-{sha[:CHECKPOINT_HASH_CHARS]}.pth", data, sha, value_sum)


@dataclass(frozen=True)
class HubRepo:
    """A hubconf repository as GitHub's zipball endpoint would serve it."""

    owner: str
    name: str
    ref: str
    commit: str  # 40 hex digits
    zip_bytes: bytes

    @property
    def top_dir(self) -> str:
        """The zipball's single top-level directory, ``<owner>-<repo>-<sha7>``."""
        return f"{self.owner}-{self.name}-{self.commit[:7]}"

    @property
    def cache_dir_name(self) -> str:
        """What torch.hub renames the extracted directory to under ``hub/``."""
        return "_".join([self.owner, self.name, self.ref.replace("/", "_")])

    @property
    def url_path(self) -> str:
        return f"/{self.owner}/{self.name}/zipball/{self.ref}"

    @property
    def spec(self) -> str:
        """The ``repo_or_dir`` argument of ``torch.hub.load``."""
        return f"{self.owner}/{self.name}:{self.ref}"


_HUBCONF = '''\
"""hubconf for a tiny test repo: one entrypoint, weights from the test server."""
dependencies = ["torch"]

import torch

from tinynet.model import TinyNet

WEIGHTS_URL = {weights_url!r}


def tinynet(pretrained=False, **kwargs):
    """A {in_features}->{out_features} linear model; pretrained weights need WEIGHTS_URL."""
    model = TinyNet(**kwargs)
    if pretrained:
        if WEIGHTS_URL is None:
            raise RuntimeError("this repo was built without a weights URL")
        state = torch.hub.load_state_dict_from_url(WEIGHTS_URL, check_hash=True, progress=False)
        model.load_state_dict(state)
    return model
'''

_MODEL = """\
import torch.nn as nn


class TinyNet(nn.Module):
    def __init__(self, in_features={in_features}, out_features={out_features}):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.fc(x)
"""


def make_hubconf_repo(
    owner: str = "hubfs",
    name: str = "tinynet",
    ref: str = "v1.0",
    weights_url: str | None = None,
) -> HubRepo:
    """Build the zipball; ``weights_url`` is baked into hubconf for ``pretrained=True``."""
    commit = hashlib.sha1(f"{owner}/{name}@{ref}".encode()).hexdigest()
    top = f"{owner}-{name}-{commit[:7]}/"
    sizes = {"in_features": IN_FEATURES, "out_features": OUT_FEATURES}
    files = {
        "README.md": f"# {name}\n\nTest repository for hubfs.\n",
        "hubconf.py": _HUBCONF.format(weights_url=weights_url, **sizes),
        "tinynet/__init__.py": "",
        "tinynet/model.py": _MODEL.format(**sizes),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.comment = commit.encode()
        # GitHub lists the top directory first (torch takes infolist()[0] as the repo
        # folder), then each directory entry before its contents.
        for directory in (top, top + "tinynet/"):
            zf.writestr(zipfile.ZipInfo(directory, _ZIP_DATE_TIME), b"")
        for path in sorted(files):
            info = zipfile.ZipInfo(top + path, _ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, files[path])
    return HubRepo(owner, name, ref, commit, buf.getvalue())


# -- client snippets: each prints one RESULT line (see run.client_result) ---------------------

_PRELUDE = """\
import json, os, sys
import torch, torch.hub
RESULT_PREFIX = {prefix!r}
def report(value):
    print(RESULT_PREFIX + json.dumps(value), flush=True)
"""


def _prelude() -> str:
    return _PRELUDE.format(prefix=RESULT_PREFIX)


def download_code(url: str, dst: str, hash_prefix: str | None = None) -> str:
    """``torch.hub.download_url_to_file``; reports the destination's size."""
    body = f"""
torch.hub.download_url_to_file({url!r}, {dst!r}, hash_prefix={hash_prefix!r}, progress=False)
report({{"size": os.path.getsize({dst!r})}})
"""
    return _prelude() + body


def load_state_dict_code(url: str, check_hash: bool = True) -> str:
    """``load_state_dict_from_url`` into ``<hub>/checkpoints``; reports the cached path."""
    body = f"""
url = {url!r}
state = torch.hub.load_state_dict_from_url(url, check_hash={check_hash!r}, progress=False)
path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
report({{
    "hub_dir": torch.hub.get_dir(),
    "path": path,
    "keys": sorted(state),
    "value_sum": float(sum(t.double().sum().item() for t in state.values())),
}})
"""
    return _prelude() + body


def mmap_load_code(path: str) -> str:
    """``torch.load(mmap=True)``: the tensors are views of a MAP_PRIVATE mapping of ``path``."""
    body = f"""
state = torch.load({path!r}, mmap=True, weights_only=True)
report({{
    "keys": sorted(state),
    "value_sum": float(sum(t.double().sum().item() for t in state.values())),
}})
"""
    return _prelude() + body


def hub_load_code(base_url: str, repo: HubRepo, pretrained: bool = True) -> str:
    """``torch.hub.load(source='github')`` with only the archive link pointed at ``base_url``."""
    body = f"""
BASE_URL = {base_url!r}

def _git_archive_link(repo_owner, repo_name, ref):
    # The one github.com URL torch.hub.load needs once validation and the ref probe are off.
    return f"{{BASE_URL}}/{{repo_owner}}/{{repo_name}}/zipball/{{ref}}"

torch.hub._git_archive_link = _git_archive_link
model = torch.hub.load(
    {repo.spec!r}, "tinynet", source="github", trust_repo=True, skip_validation=True,
    pretrained={pretrained!r},
)
x = torch.ones(1, {IN_FEATURES})
report({{
    "hub_dir": torch.hub.get_dir(),
    "type": type(model).__name__,
    "value_sum": float(sum(p.double().sum().item() for p in model.state_dict().values())),
    "output": model(x).detach().tolist(),
}})
"""
    return _prelude() + body
