"""The object-store client of a cluster store: one S3-compatible bucket shared by every node.

Owns bytes at rest in the bucket and nothing else: key layout, the self-verifying content
format, conditional publishing, bounded retries and the one-line errors a user reads. The
upload queue (``upload_queue``) and the namespace log (``namespace_log``, ``cluster_sync``)
build on it; it knows neither.

Client library: boto3/botocore. It is the S3 client every S3-compatible store tests against,
it reads the standard ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` and the shared config and
credentials files (profiles, SSO, instance roles) exactly as the AWS CLI does, it is thread-safe
per client, and it exposes conditional writes (``IfNoneMatch``). obstore is faster per call but
does not read the AWS config files, and a read here is bounded by the network, not the client.

Layout under ``s3://BUCKET/PREFIX``::

    PREFIX/content/ab/ab12...ef   one object per file content, named by its content id (hex)
    PREFIX/log/NODE/SEQ           immutable namespace log segments of each node (namespace_log)
    PREFIX/snap/GEN               compacted namespace snapshots (namespace_log)

A content object carries its own chunk table in front of its bytes, so that any byte range can
be fetched and checked without trusting the store::

    0   8s  magic b"HUBFSCNT"
    8   B   version (1)
    9   3x  zero
    12  Q   size of the content in bytes
    20  I   number of chunks n
    24  n x (I length, 32s BLAKE3 chunk id)
    24 + 36 n   the content's bytes, contiguous (a range GET maps to file offsets)

The table is checked against the key (``contents.content_id`` of size and chunk ids), every
fetched chunk against its BLAKE3 id. Uploads check the local bytes the same way while they
stream, so a damaged local copy is never published. An S3 PUT is atomic: an object appears
whole or not at all, and a multipart upload appears only when completed.

Every call has a connect and a read timeout and retries with jittered exponential backoff within
a deadline, so a store that is down or hung fails a call after at most
``deadline_s + connect_timeout_s + read_timeout_s`` with one line naming the remote. Credentials
never appear in a message or a log record: errors name the variable or file to fix.
"""

from __future__ import annotations

import bisect
import io
import logging
import os
import random
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import blake3
import boto3
import botocore.config
import botocore.exceptions
import botocore.loaders
import botocore.session

from .contents import content_id
from .errors import (
    HubfsError,
    RemoteAuthError,
    RemoteConflictError,
    RemoteError,
    RemoteIntegrityError,
    RemoteUnavailableError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 15.0
DEADLINE_S = 30.0
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
# Above this a content goes up in parts, so that a failed request costs one part, not the file.
MULTIPART_THRESHOLD_BYTES = 256 << 20
PART_BYTES = 64 << 20
# The first GET of a content asks for this much: the whole table of ~1,800 chunks.
TABLE_PROBE_BYTES = 64 << 10
TABLE_CACHE_ENTRIES = 4096
REGION_DEFAULT = "us-east-1"

CONTENT_MAGIC = b"HUBFSCNT"
CONTENT_VERSION = 1
CONTENT_HEAD = struct.Struct("<8sB3xQI")
CONTENT_CHUNK = struct.Struct("<I32s")

# S3 error codes that mean "these credentials are wrong", with the setting that fixes each.
_KEY_ID_CODES = {"InvalidAccessKeyId", "InvalidClientTokenId", "AuthorizationHeaderMalformed"}
_SECRET_CODES = {"SignatureDoesNotMatch", "InvalidSignature"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "Forbidden", "403"}
_RETRY_CODES = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
                "InternalError", "ServiceUnavailable"}
_NETWORK_ERRORS = (botocore.exceptions.HTTPClientError, botocore.exceptions.ConnectionError,
                   botocore.exceptions.IncompleteReadError)


@dataclass(frozen=True)
class RemoteURL:
    """``s3://BUCKET/PREFIX``: the bucket and the key prefix (no slashes at its ends)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> RemoteURL:
        if not url.startswith("s3://"):
            raise HubfsError(f"{url!r} is not a remote: give it as s3://BUCKET/PREFIX", 2)
        bucket, _, prefix = url[len("s3://"):].partition("/")
        prefix = prefix.strip("/")
        if not bucket or "//" in prefix:
            raise HubfsError(f"{url!r} is not a remote: give it as s3://BUCKET/PREFIX", 2)
        return cls(bucket, prefix)

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the prefix
    size: int


@dataclass(frozen=True)
class ContentTable:
    """A remote content's chunk table, checked against its id."""

    content_id: bytes
    size: int
    chunk_lengths: tuple[int, ...]
    chunk_ids: tuple[bytes, ...]
    chunk_starts: tuple[int, ...]  # offset of each chunk in the content
    data_offset: int  # where the content's bytes begin in the object

    @classmethod
    def build(cls, cid: bytes, lengths: tuple[int, ...], ids: tuple[bytes, ...]) -> ContentTable:
        starts, pos = [], 0
        for length in lengths:
            starts.append(pos)
            pos += length
        return cls(cid, pos, lengths, ids, tuple(starts),
                   CONTENT_HEAD.size + CONTENT_CHUNK.size * len(lengths))

    def encode(self) -> bytes:
        parts = [CONTENT_HEAD.pack(CONTENT_MAGIC, CONTENT_VERSION, self.size, len(self.chunk_ids))]
        parts += [CONTENT_CHUNK.pack(n, c) for n, c in zip(self.chunk_lengths, self.chunk_ids)]
        return b"".join(parts)


@dataclass(frozen=True)
class FetchedChunks:
    """Chunks [first, stop) of a content, verified, as one contiguous run of bytes."""

    table: ContentTable
    first: int
    stop: int
    data: bytes

    @property
    def start(self) -> int:
        """The offset of ``data`` in the content."""
        return self.table.chunk_starts[self.first] if self.stop > self.first else 0

    def chunks(self) -> Iterator[tuple[bytes, memoryview]]:
        """(chunk id, bytes) of each chunk, for the local store."""
        view, base = memoryview(self.data), self.start
        for i in range(self.first, self.stop):
            pos = self.table.chunk_starts[i] - base
            yield self.table.chunk_ids[i], view[pos:pos + self.table.chunk_lengths[i]]


def content_key(cid: bytes) -> str:
    hexid = cid.hex()
    return f"content/{hexid[:2]}/{hexid}"


@dataclass
class RemoteStats:
    """Counters for ``hubfs stats``; updated under ``lock`` from any thread."""

    requests: int = 0
    retries: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    contents_uploaded: int = 0
    contents_present: int = 0  # put_content found it already there: no bytes sent
    integrity_failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


class _ContentBody(io.RawIOBase):
    """The bytes of a content object: its table, then the local data, each chunk checked
    against its id as it streams past. A mismatch raises inside ``read``, which aborts the
    request, so a damaged local copy never becomes an object. Seekable, for retries."""

    def __init__(self, table: ContentTable, open_data: Callable[[], IO[bytes]]) -> None:
        super().__init__()
        self._head = table.encode()
        self._table = table
        self._open_data = open_data
        self._data: IO[bytes] | None = None
        self._pos = 0
        self._chunk = 0
        self._hasher = blake3.blake3()
        self._hashed = 0  # bytes of the current chunk hashed so far
        self.length = len(self._head) + table.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self._pos + offset,
                  io.SEEK_END: self.length + offset}[whence]
        if target == self._pos:
            return target
        if target != 0 and target != self.length:
            raise io.UnsupportedOperation("a content body rewinds to its start only")
        if target == 0:
            self._reset()
        self._pos = target
        return target

    def _reset(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None
        self._pos, self._chunk, self._hashed = 0, 0, 0
        self._hasher = blake3.blake3()

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        if self._pos >= self.length or not len(view):
            return 0
        if self._pos < len(self._head):
            n = min(len(view), len(self._head) - self._pos)
            view[:n] = self._head[self._pos:self._pos + n]
            self._pos += n
            return n
        if self._data is None:
            self._data = self._open_data()
            self._data.seek(self._pos - len(self._head))
        want = min(len(view), self.length - self._pos)
        got = self._data.read(want)
        if not got:
            raise RemoteIntegrityError(
                f"content {self._table.content_id.hex()}: the local copy ends "
                f"{self.length - self._pos} bytes early; run `hubfs verify --repair`",
                self._table.content_id)
        view[:len(got)] = got
        self._check(got)
        self._pos += len(got)
        return len(got)

    def _check(self, data: bytes) -> None:
        table, pos = self._table, 0
        while pos < len(data):
            need = table.chunk_lengths[self._chunk] - self._hashed
            piece = data[pos:pos + need]
            self._hasher.update(piece)
            self._hashed += len(piece)
            pos += len(piece)
            if self._hashed == table.chunk_lengths[self._chunk]:
                if self._hasher.digest() != table.chunk_ids[self._chunk]:
                    raise RemoteIntegrityError(
                        f"content {table.content_id.hex()}: local chunk {self._chunk} does not "
                        "match its id, so it was not uploaded; run `hubfs verify --repair`",
                        table.content_id)
                self._chunk += 1
                self._hashed = 0
                self._hasher = blake3.blake3()

    def close(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None
        super().close()


def _read_exactly(stream: IO[bytes] | io.RawIOBase, n: int) -> bytes:
    """Up to n bytes, fewer only at the end: a raw stream's read may return less."""
    out = bytearray()
    while len(out) < n:
        got = stream.read(n - len(out))
        if not got:
            break
        out += got
    return bytes(out)


_loader_lock = threading.Lock()
_loader: botocore.loaders.Loader | None = None


def _shared_loader() -> botocore.loaders.Loader:
    """botocore's service models, parsed once per process: a fresh session per ``Remote``
    (credentials and settings as they are now) would otherwise spend ~0.2 s parsing them."""
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        return _loader


class Remote:
    """A bucket prefix that holds one cluster store. Thread-safe: one client, shared."""

    def __init__(self, url: RemoteURL | str, *, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 read_timeout_s: float = READ_TIMEOUT_S, deadline_s: float = DEADLINE_S,
                 max_connections: int = 16) -> None:
        self.url = url if isinstance(url, RemoteURL) else RemoteURL.parse(url)
        self.deadline_s = deadline_s
        self.stats = RemoteStats()
        core = botocore.session.get_session()
        core.register_component("data_loader", _shared_loader())
        config = botocore.config.Config(
            connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
            retries={"total_max_attempts": 1},  # retried here, within one deadline
            max_pool_connections=max_connections,
            # hubfs checks every byte by BLAKE3; optional CRCs trip some S3-compatible stores.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            self._session = boto3.session.Session(botocore_session=core)
            region = (os.environ.get("AWS_REGION") or self._session.region_name
                      or REGION_DEFAULT)
            self._client = self._session.client("s3", region_name=region, config=config)
        except botocore.exceptions.ProfileNotFound as exc:
            raise RemoteError(f"{self.url}: AWS_PROFILE names {exc.kwargs.get('profile')!r}, "
                              "a profile the AWS config files do not have: fix AWS_PROFILE",
                              2) from None
        except ValueError as exc:  # botocore's "Invalid endpoint: ..."
            raise RemoteError(f"{self.url}: {exc}: fix AWS_ENDPOINT_URL (for example "
                              "http://127.0.0.1:8333)", 2) from None
        self.endpoint = self._client.meta.endpoint_url
        self._tables: OrderedDict[bytes, ContentTable] = OrderedDict()
        self._tables_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Remote({self.url}, endpoint={self.endpoint})"

    # ---- errors ------------------------------------------------------------------------------

    def _where(self) -> str:
        return f"{self.url} (at {self.endpoint})"

    def _credential_setting(self, secret: bool) -> str:
        """Which setting to fix for a rejected key, by where botocore found the credentials."""
        var = "AWS_SECRET_ACCESS_KEY" if secret else "AWS_ACCESS_KEY_ID"
        try:
            creds = self._session.get_credentials()
        except botocore.exceptions.BotoCoreError:
            creds = None
        method = getattr(creds, "method", "env")
        if method == "shared-credentials-file":
            path = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
            return f"{var.lower()} in {path} (profile {self._session.profile_name})"
        if method == "config-file":
            path = os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")
            return f"{var.lower()} in {path} (profile {self._session.profile_name})"
        if method == "env":
            return var
        return f"the credentials from {method}"

    def _auth_error(self, code: str, what: str) -> RemoteAuthError:
        if code in _KEY_ID_CODES:
            fix = (f"the object store does not know the access key id ({code}): set "
                   f"{self._credential_setting(secret=False)}")
        elif code in _SECRET_CODES:
            fix = (f"the object store rejected the secret key ({code}): set "
                   f"{self._credential_setting(secret=True)}")
        else:
            fix = (f"access denied ({code}): give the key read, write and list rights on the "
                   f"bucket, or set {self._credential_setting(secret=False)} to a key that has "
                   "them")
        return RemoteAuthError(f"{self._where()}: {what}: {fix}")

    def _explain_403(self, what: str) -> RemoteAuthError:
        """A HEAD answers 403 with no body; a one-key listing names the cause."""
        try:
            self._client.list_objects_v2(Bucket=self.url.bucket, Prefix=self.url.key(""),
                                         MaxKeys=1)
        except botocore.exceptions.ClientError as exc:
            return self._auth_error(exc.response.get("Error", {}).get("Code", "403"), what)
        except (*_NETWORK_ERRORS, botocore.exceptions.BotoCoreError):
            pass
        return self._auth_error("AccessDenied", what)

    def _call(self, what: str, fn: Callable[[], T], *, ok_codes: frozenset[str] = frozenset(),
              ) -> T:
        """Run one request with bounded retries. ClientErrors whose code is in ``ok_codes``
        (NoSuchKey, PreconditionFailed...) go to the caller unchanged."""
        deadline = time.monotonic() + self.deadline_s
        attempt = 0
        while True:
            self.stats.add(requests=1)
            try:
                return fn()
            except botocore.exceptions.ClientError as exc:
                err = exc.response.get("Error", {})
                code = str(err.get("Code", ""))
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
                if code in ok_codes:
                    raise
                if code in _KEY_ID_CODES | _SECRET_CODES:
                    raise self._auth_error(code, what) from None
                if status == 403 or code in _DENIED_CODES:
                    raise self._explain_403(what) from None
                if code == "RequestTimeTooSkewed":
                    raise RemoteError(f"{self._where()}: {what}: this machine's clock differs "
                                      "from the object store's by more than 15 minutes: set "
                                      "the clock (NTP)") from None
                if code == "NoSuchBucket":
                    raise RemoteError(f"{self._where()}: {what}: the bucket does not exist: "
                                      "create it, or fix the URL") from None
                if status < 500 and code not in _RETRY_CODES:
                    raise RemoteError(f"{self._where()}: {what}: the object store answered "
                                      f"{status} {code}") from None
                reason = f"{status} {code}"
            except (botocore.exceptions.NoCredentialsError,
                    botocore.exceptions.PartialCredentialsError):
                raise RemoteAuthError(
                    f"{self._where()}: {what}: no credentials found: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials") from None
            except _NETWORK_ERRORS as exc:
                reason = type(exc).__name__
            attempt += 1
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** attempt) * random.uniform(0.5, 1)
            if time.monotonic() + delay >= deadline:
                raise RemoteUnavailableError(
                    f"{self._where()}: {what}: no answer within {self.deadline_s:g}s "
                    f"({attempt} tries, last: {reason}); check that the object store is up "
                    "and AWS_ENDPOINT_URL points at it") from None
            log.debug("%s: %s failed (%s), retry %d in %.2fs", self.url, what, reason, attempt,
                      delay)
            self.stats.add(retries=1)
            time.sleep(delay)

    # ---- objects -------------------------------------------------------------------------------

    def head(self, rel: str) -> int | None:
        """The object's size, or None when there is none."""
        key = self.url.key(rel)
        try:
            meta = self._call(f"HEAD {rel}", lambda: self._client.head_object(
                Bucket=self.url.bucket, Key=key), ok_codes=frozenset({"404", "NoSuchKey"}))
        except botocore.exceptions.ClientError:
            return None
        return int(meta["ContentLength"])

    def exists(self, rel: str) -> bool:
        return self.head(rel) is not None

    def get(self, rel: str) -> bytes | None:
        """The whole object, or None when there is none."""
        key = self.url.key(rel)

        def fetch() -> bytes:
            body = self._client.get_object(Bucket=self.url.bucket, Key=key)["Body"]
            with body:
                return bytes(body.read())

        try:
            data = self._call(f"GET {rel}", fetch, ok_codes=frozenset({"NoSuchKey", "404"}))
        except botocore.exceptions.ClientError:
            return None
        self.stats.add(bytes_down=len(data))
        return data

    def get_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object; fewer only where the object ends before ``end``."""
        if end <= start:
            return b""
        key, rng = self.url.key(rel), f"bytes={start}-{end - 1}"

        def fetch() -> bytes:
            body = self._client.get_object(Bucket=self.url.bucket, Key=key, Range=rng)["Body"]
            with body:
                return bytes(body.read())

        try:
            data = self._call(f"GET {rel} [{start}, {end})", fetch,
                              ok_codes=frozenset({"NoSuchKey", "404", "InvalidRange"}))
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "InvalidRange":
                return b""
            raise RemoteError(f"{self._where()}: GET {rel}: no such object") from None
        self.stats.add(bytes_down=len(data))
        return data

    def put_if_absent(self, rel: str, data: bytes) -> bool:
        """Create the object unless the key exists (``If-None-Match: *``). True if created."""
        key = self.url.key(rel)
        try:
            self._call(f"PUT {rel}", lambda: self._client.put_object(
                Bucket=self.url.bucket, Key=key, Body=data, IfNoneMatch="*"),
                ok_codes=frozenset({"PreconditionFailed", "ConditionalRequestConflict"}))
        except botocore.exceptions.ClientError:
            return False
        self.stats.add(bytes_up=len(data))
        return True

    def publish(self, rel: str, data: bytes) -> bool:
        """Create an immutable object; idempotent. True if this call created it, False if it
        already held these bytes (an earlier try whose answer was lost). Different bytes under
        the key raise ``RemoteConflictError``."""
        if self.put_if_absent(rel, data):
            return True
        existing = self.get(rel)
        if existing == data:
            return False
        raise RemoteConflictError(
            f"{self._where()}: {rel} already holds other bytes: another node publishes under "
            "the same node name; give each node its own")

    def delete(self, rel: str) -> None:
        key = self.url.key(rel)
        self._call(f"DELETE {rel}", lambda: self._client.delete_object(
            Bucket=self.url.bucket, Key=key))

    def list_objects(self, rel_prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects under a prefix, in key order, after ``start_after`` (relative) if given."""
        base = self.url.key("")
        args: dict[str, Any] = {"Bucket": self.url.bucket, "Prefix": self.url.key(rel_prefix)}
        if start_after is not None:
            args["StartAfter"] = self.url.key(start_after)
        while True:
            page = self._call(f"LIST {rel_prefix}",
                              lambda: self._client.list_objects_v2(**args))
            for item in page.get("Contents", ()):
                yield ObjectInfo(item["Key"][len(base):], int(item["Size"]))
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]
            args.pop("StartAfter", None)

    def list_dirs(self, rel_prefix: str) -> list[str]:
        """The names one level below a prefix ending in '/' (S3 common prefixes)."""
        base = self.url.key(rel_prefix)
        args: dict[str, Any] = {"Bucket": self.url.bucket, "Prefix": base, "Delimiter": "/"}
        names: list[str] = []
        while True:
            page = self._call(f"LIST {rel_prefix}",
                              lambda: self._client.list_objects_v2(**args))
            names += [p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", ())]
            if not page.get("IsTruncated"):
                return names
            args["ContinuationToken"] = page["NextContinuationToken"]

    def check(self) -> None:
        """Fail now, with the one-line error, if the bucket cannot be listed."""
        next(self.list_objects(""), None)

    # ---- contents --------------------------------------------------------------------------

    def has_content(self, cid: bytes) -> bool:
        return self.exists(content_key(cid))

    def put_content(self, cid: bytes, chunk_lengths: tuple[int, ...],
                    chunk_ids: tuple[bytes, ...], open_data: Callable[[], IO[bytes]]) -> bool:
        """Upload a content unless the bucket holds it. True if this call uploaded it.

        ``open_data`` opens the content's bytes, positioned at 0; it may be called again for a
        retry. Each chunk is checked against its id as it streams."""
        table = ContentTable.build(cid, tuple(chunk_lengths), tuple(chunk_ids))
        if content_id(table.size, table.chunk_ids) != cid:
            raise ValueError(f"content {cid.hex()}: its chunk table does not give its id")
        rel = content_key(cid)
        if self.exists(rel):
            self.stats.add(contents_present=1)
            return False
        body = _ContentBody(table, open_data)
        try:
            if body.length <= MULTIPART_THRESHOLD_BYTES:
                created = self._put_body(rel, body)
            else:
                created = self._put_multipart(rel, body)
        finally:
            body.close()
        self.stats.add(**({"contents_uploaded": 1} if created else {"contents_present": 1}))
        return created

    def _put_body(self, rel: str, body: _ContentBody) -> bool:
        key = self.url.key(rel)

        def put() -> None:
            body.seek(0)
            self._client.put_object(Bucket=self.url.bucket, Key=key, Body=body,
                                    ContentLength=body.length, IfNoneMatch="*")

        try:
            self._call(f"PUT {rel}", put,
                       ok_codes=frozenset({"PreconditionFailed", "ConditionalRequestConflict"}))
        except botocore.exceptions.ClientError:
            return False  # another node uploaded it meanwhile: same id, same bytes
        self.stats.add(bytes_up=body.length)
        return True

    def _put_multipart(self, rel: str, body: _ContentBody) -> bool:
        key, bucket = self.url.key(rel), self.url.bucket
        upload = self._call(f"CREATE-MULTIPART {rel}", lambda: self._client
                            .create_multipart_upload(Bucket=bucket, Key=key))["UploadId"]
        try:
            parts = []
            body.seek(0)
            number = 1
            while True:
                data = _read_exactly(body, PART_BYTES)
                if not data:
                    break
                def put_part(n: int = number, d: bytes = data) -> dict[str, Any]:
                    return self._client.upload_part(Bucket=bucket, Key=key, UploadId=upload,
                                                    PartNumber=n, Body=d)

                etag = self._call(f"PUT {rel} part {number}", put_part)["ETag"]
                parts.append({"PartNumber": number, "ETag": etag})
                self.stats.add(bytes_up=len(data))
                number += 1
            try:
                self._call(f"COMPLETE {rel}", lambda: self._client.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts},
                    IfNoneMatch="*"),
                    ok_codes=frozenset({"PreconditionFailed", "ConditionalRequestConflict"}))
            except botocore.exceptions.ClientError:
                self._abort(rel, upload)
                return False
            return True
        except BaseException:
            self._abort(rel, upload)
            raise

    def _abort(self, rel: str, upload: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.url.bucket, Key=self.url.key(rel),
                                                UploadId=upload)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            log.info("%s: could not abort the multipart upload of %s (%s); the bucket's "
                     "lifecycle rule for incomplete uploads removes it", self.url, rel,
                     type(exc).__name__)

    def abort_stale_uploads(self, older_than_s: float = 86400.0) -> int:
        """Abort multipart uploads under the prefix begun more than ``older_than_s`` ago (a
        node killed mid-upload leaves one; it is invisible but holds space). The number
        aborted. Younger ones may be another node's upload in progress and are left alone."""
        args: dict[str, Any] = {"Bucket": self.url.bucket, "Prefix": self.url.key("")}
        cutoff = time.time() - older_than_s
        aborted = 0
        while True:
            page = self._call("LIST-MULTIPART", lambda: self._client.list_multipart_uploads(
                **args))
            for up in page.get("Uploads", ()):
                if up["Initiated"].timestamp() <= cutoff:
                    rel = up["Key"][len(self.url.key("")):]
                    self._abort(rel, up["UploadId"])
                    aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            args["KeyMarker"] = page.get("NextKeyMarker")
            args["UploadIdMarker"] = page.get("NextUploadIdMarker")

    def content_table(self, cid: bytes) -> ContentTable:
        """A content's chunk table, fetched once and checked against its id."""
        with self._tables_lock:
            table = self._tables.get(cid)
            if table is not None:
                self._tables.move_to_end(cid)
                return table
        rel = content_key(cid)
        head = self.get_range(rel, 0, TABLE_PROBE_BYTES)
        if len(head) < CONTENT_HEAD.size:
            raise self._damaged(cid, "its table is cut short")
        magic, version, size, count = CONTENT_HEAD.unpack_from(head)
        if magic != CONTENT_MAGIC or version != CONTENT_VERSION:
            raise self._damaged(cid, "it does not start with a content table")
        table_end = CONTENT_HEAD.size + CONTENT_CHUNK.size * count
        if len(head) < table_end:
            head += self.get_range(rel, len(head), table_end)
        if len(head) < table_end:
            raise self._damaged(cid, "its table is cut short")
        pairs = [CONTENT_CHUNK.unpack_from(head, CONTENT_HEAD.size + CONTENT_CHUNK.size * i)
                 for i in range(count)]
        lengths = tuple(p[0] for p in pairs)
        ids = tuple(p[1] for p in pairs)
        if sum(lengths) != size or content_id(size, ids) != cid:
            raise self._damaged(cid, "its table does not match its id")
        table = ContentTable.build(cid, lengths, ids)
        with self._tables_lock:
            self._tables[cid] = table
            while len(self._tables) > TABLE_CACHE_ENTRIES:
                self._tables.popitem(last=False)
        return table

    def _damaged(self, cid: bytes, why: str) -> RemoteIntegrityError:
        self.stats.add(integrity_failures=1)
        return RemoteIntegrityError(
            f"{self._where()}: {content_key(cid)} is damaged ({why}); a node holding the "
            "content uploads it again with `hubfs verify --repair`", cid)

    def fetch_chunks(self, cid: bytes, offset: int, length: int) -> FetchedChunks:
        """The whole chunks that bytes [offset, offset + length) of a content touch, each
        checked against its id: what a node keeps in its local store after a lazy read.

        A chunk that does not match is fetched once more (damage in transit); still wrong, it
        raises ``RemoteIntegrityError``."""
        table = self.content_table(cid)
        end = min(offset + length, table.size)
        if offset >= end:
            return FetchedChunks(table, 0, 0, b"")
        first = bisect.bisect_right(table.chunk_starts, offset) - 1
        last = bisect.bisect_left(table.chunk_starts, end) - 1
        span_start = table.chunk_starts[first]
        span_end = table.chunk_starts[last] + table.chunk_lengths[last]
        rel = content_key(cid)
        for attempt in (1, 2):
            data = self.get_range(rel, table.data_offset + span_start,
                                  table.data_offset + span_end)
            bad = self._bad_chunk(table, first, last, data)
            if bad is None:
                return FetchedChunks(table, first, last + 1, data)
            log.info("%s: %s chunk %d does not match its id (try %d)", self.url, rel, bad,
                     attempt)
        raise self._damaged(cid, f"chunk {bad} does not match its id")

    def read_content(self, cid: bytes, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of a content, every chunk they touch checked."""
        got = self.fetch_chunks(cid, offset, length)
        if not got.data:
            return b""
        start = offset - got.start
        return got.data[start:start + length]

    @staticmethod
    def _bad_chunk(table: ContentTable, first: int, last: int, data: bytes) -> int | None:
        base = table.chunk_starts[first]
        view = memoryview(data)  # slices without copies
        for i in range(first, last + 1):
            start = table.chunk_starts[i] - base
            piece = view[start:start + table.chunk_lengths[i]]
            if len(piece) != table.chunk_lengths[i] or \
                    blake3.blake3(piece).digest() != table.chunk_ids[i]:
                return i
        return None

    def repair_content(self, cid: bytes, chunk_lengths: tuple[int, ...],
                       chunk_ids: tuple[bytes, ...], open_data: Callable[[], IO[bytes]]) -> None:
        """Overwrite a damaged content object with a verified local copy (the one unconditional
        PUT: the key's bytes are known wrong, and a good copy has the same id)."""
        table = ContentTable.build(cid, tuple(chunk_lengths), tuple(chunk_ids))
        body = _ContentBody(table, open_data)
        rel, key = content_key(cid), self.url.key(content_key(cid))

        def put() -> None:
            body.seek(0)
            self._client.put_object(Bucket=self.url.bucket, Key=key, Body=body,
                                    ContentLength=body.length)

        try:
            self._call(f"PUT {rel}", put)
        finally:
            body.close()
        with self._tables_lock:
            self._tables.pop(cid, None)
        log.info("%s: %s uploaded again from the local copy", self.url, rel)
