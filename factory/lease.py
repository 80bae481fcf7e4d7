"""One writer per output: a lease object kept on the storage itself.

    <output>/_lease.json   {"owner": ..., "host": ..., "pid": ..., "expires": ..., "heartbeat": ...}

The promise for two builds started into one output at once: exactly one gets the lease and builds;
the other is refused with a one-line `LeaseError` naming the output and the holder. The lease is
created with an exclusive write (S3: `PutObject` with `If-None-Match: *`; locally: written whole,
then hard-linked into place, which fails if a lease is there), renewed by a heartbeat thread with a
compare-and-swap (S3: `If-Match` on the ETag it wrote), and deleted at the end. A build that
crashed cannot release it: its lease is taken over once it expires, or at once when the holder was a
process on this host that no longer runs. A holder whose renewal fails (someone took the lease over)
is told by `check`, and stops before publishing its manifest.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from factory import storage

LEASE_FILE = "_lease.json"


class LeaseError(RuntimeError):
    """The output is being written by another build (or this build lost its lease)."""


@dataclass
class Lease:
    """A held lease on `output`; `release` (or the context manager) gives it back."""

    output: str
    seconds: float
    """How long the lease lives without a heartbeat; renewed every third of it."""
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    _tag: str | None = None
    """The ETag (S3) or content (local) of the lease as this holder last wrote it."""
    _lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return storage.join(self.output, LEASE_FILE)

    def record(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": now, "expires": now + self.seconds}, sort_keys=True).encode()

    def check(self) -> None:
        """Raise LeaseError if the lease was lost (taken over after this holder stalled)."""
        if self._lost:
            raise LeaseError(f"{self.output}: this build lost its lease ({self._lost}); another build "
                             "may be writing it, so nothing more is published")

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self._tag = _replace(self.url, self.record(), self._tag)
            except LeaseError as e:
                self._lost = str(e)
                return
            except Exception:  # a storage hiccup: the next beat tries again before the lease expires
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._lost:
            _delete(self.url, self._tag)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            self.release()
        except (OSError, storage.StorageError) as e:
            if exc_type is None:  # else the build's own error says more; the lease expires (or, its
                raise storage.StorageError(  # driver gone, is taken over at once on this host)
                    f"cannot release the lease {self.url}: {getattr(e, 'strerror', None) or e}") from None


def acquire(output: str, seconds: float = 60.0) -> Lease:
    """Take the lease on `output` (creating the folder/prefix if needed) and start its heartbeat;
    LeaseError if a live build holds it."""
    storage.makedirs(output)
    lease = Lease(output, seconds)
    for _ in range(5):  # each round either creates, takes over, or finds a live holder
        try:
            lease._tag = _create(lease.url, lease.record())
            break
        except FileExistsError:
            pass
        found = _read(lease.url)
        if found is None:
            continue  # released between our create and read
        holder, tag = found
        if not _stale(holder):
            raise LeaseError(
                f"{output} is being built by another build (owner {holder.get('owner', '?')[:12]} on "
                f"{holder.get('host', '?')} pid {holder.get('pid', '?')}, lease expires in "
                f"{max(0.0, holder.get('expires', 0) - time.time()):.0f} s); wait for it or choose another output")
        try:
            lease._tag = _replace(lease.url, lease.record(), tag)
            break
        except LeaseError:
            continue  # another build took it over first: look again
    else:
        raise LeaseError(f"{output}: could not take the lease (it kept changing hands)")
    lease._thread = threading.Thread(target=lease._beat, name="factory-lease", daemon=True)
    lease._thread.start()
    return lease


def holder(output: str) -> dict | None:
    """The lease record on `output`, if any (live or stale)."""
    found = _read(storage.join(output, LEASE_FILE))
    return found[0] if found else None


def _stale(record: dict) -> bool:
    """Expired, or held by a process of this host that has ended."""
    if record.get("expires", 0) < time.time():
        return True
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


# The storage primitives: an exclusive create, a compare-and-swap replace, a read with its tag and a
# conditional delete, on S3 (ETags and conditional requests) and on local disks (a hard link that
# fails on an existing lease, a takeover marker). Other fsspec stores are not supported: they have
# no conditional write.

def _s3(url: str):
    fs, path = storage.filesystem(url)
    bucket, key = path.split("/", 1)
    return fs, bucket, key


def _create(url: str, data: bytes) -> str:
    """Write `data` at `url` only if nothing is there (FileExistsError otherwise); returns its tag."""
    if url.startswith("s3://"):
        fs, bucket, key = _s3(url)
        return _s3_call(url, fs, "put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
    if not storage.is_local(url):
        raise storage.StorageError(f"{url}: leases need S3 or a local disk (a conditional write)")
    # Written whole under a private name, then linked into place: the link fails if a lease exists,
    # and a reader never sees a lease created but not yet written (an empty file would read as a
    # stale lease and be taken over while its creator still writes it).
    path = storage.local_path(url)
    tmp = _write_private(path, data)
    try:
        os.link(tmp, path)  # FileExistsError (EEXIST) if a lease is there
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        _write_new(path, data)  # a disk without hard links: an exclusive create, then the write
    finally:
        os.remove(tmp)
    return data.decode()


def _write_new(path: str, data: bytes) -> None:
    """Write `data` to a file created at `path` (FileExistsError if one is there) and sync it."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_private(path: str, data: bytes) -> str:
    """`data` written and synced under a private name beside `path`; returns that name."""
    tmp = f"{path}.{storage.TEMPORARY_PREFIX}{uuid.uuid4().hex}"
    _write_new(tmp, data)
    return tmp


def _read(url: str) -> tuple[dict, str] | None:
    """(record, tag) of the lease at `url`, None if there is none."""
    if url.startswith("s3://"):
        fs, bucket, key = _s3(url)
        try:
            tag = fs.info(f"{bucket}/{key}", refresh=True)["ETag"]
            data = fs.cat_file(f"{bucket}/{key}")
        except FileNotFoundError:
            return None
    else:
        try:
            with open(storage.local_path(url), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        tag = data.decode(errors="replace")
    try:
        return json.loads(data), tag
    except ValueError:
        return {"owner": "?", "expires": 0}, tag  # an unreadable lease is stale: take it over


def _replace(url: str, data: bytes, tag: str | None) -> str:
    """Replace the lease at `url` with `data` if it is still the one tagged `tag`; LeaseError if not."""
    if url.startswith("s3://"):
        fs, bucket, key = _s3(url)
        try:
            return _s3_call(url, fs, "put_object", Bucket=bucket, Key=key, Body=data, IfMatch=tag)["ETag"]
        except OSError as e:
            if e.errno == errno.EINVAL or isinstance(e, FileNotFoundError):  # 412 Precondition Failed, or gone
                raise LeaseError(f"{url} changed hands") from None
            raise
    path = storage.local_path(url)
    marker = f"{path}.{storage.TEMPORARY_PREFIX}swap"
    try:  # one swapper at a time; a marker left by a crashed swapper is cleared after a while
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        if time.time() - os.path.getmtime(marker) > 30:
            os.remove(marker)
        raise LeaseError(f"{url} is being swapped by another build") from None
    try:
        os.close(fd)
        try:
            with open(path, "rb") as f:
                current = f.read().decode(errors="replace")
        except FileNotFoundError:
            current = None
        if current != tag:
            raise LeaseError(f"{url} changed hands")
        os.replace(_write_private(path, data), path)
        return data.decode()
    finally:
        os.remove(marker)


def _delete(url: str, tag: str | None) -> None:
    """Remove the lease if it is still ours (a lease taken over by another build is left alone)."""
    found = _read(url)
    if found is None or found[1] != tag:
        return
    if url.startswith("s3://"):
        fs, bucket, key = _s3(url)
        _s3_call(url, fs, "delete_object", Bucket=bucket, Key=key)
    else:
        try:
            os.remove(storage.local_path(url))
        except FileNotFoundError:
            pass


def _s3_call(url: str, fs, method: str, **kwargs) -> dict:
    try:
        return fs.call_s3(method, **kwargs)
    except (FileExistsError, OSError):
        raise
    except Exception as e:
        if type(e).__module__.startswith("botocore"):
            raise storage.StorageError(f"cannot reach S3 for {url}: {str(e).splitlines()[0]}") from None
        raise
