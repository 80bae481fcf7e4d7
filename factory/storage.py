"""Every filesystem the factory touches is built here, from a URL and one `storage` config.

Local paths and `file://` URLs map to the local filesystem; `s3://` URLs to s3fs (and, for Arrow
readers and writers, `pyarrow.fs.S3FileSystem`), both pointed at `storage.endpoint_url`; any other
fsspec protocol goes through fsspec. Each process that touches storage calls `configure` with the
run's config first (drivers, Ray actors and Ray Train workers alike). Writes that must look atomic
go through `publish`: write a temporary name, then move it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import fsspec
from fsspec.implementations.local import LocalFileSystem

from factory.config import StorageConfig


class StorageError(RuntimeError):
    """A storage location is missing, unreachable or not writable; the message names it."""


_settings = StorageConfig()
TEMPORARY_PREFIX = ".tmp-"
"""Names `publish` writes before moving into place; readers and listings skip them."""


def configure(cfg: StorageConfig) -> None:
    """Use `cfg` for every filesystem this process builds from now on."""
    global _settings
    _settings = cfg


def current() -> StorageConfig:
    """The settings this process builds filesystems from (to hand to another process)."""
    return _settings


@contextmanager
def configured(cfg: StorageConfig) -> Iterator[None]:
    """`cfg` for the calls inside the block, the process's settings back after it (a reader of one
    endpoint among others: `configure` would change them for every reader in the process)."""
    global _settings
    before, _settings = _settings, cfg
    try:
        yield
    finally:
        _settings = before


def filesystem(url: str, settings: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or an fsspec URL, built from `settings` (default:
    the process's, see `configure`). A URL carrying credentials (`s3://KEY:SECRET@bucket/...`, which
    fsspec would accept) is refused without repeating them."""
    s = settings or _settings
    if "://" not in url:
        return LocalFileSystem(), os.path.abspath(url)
    scheme, _, rest = url.partition("://")
    userinfo = rest.rpartition("@")[0]  # KEY:SECRET (a secret may hold '/', a key id never does)
    if "@" in rest.split("/", 1)[0] or (":" in userinfo and "/" not in userinfo.split(":", 1)[0]):
        raise StorageError(f"{scheme}://***@{rest.rpartition('@')[2]}: credentials in a URL are refused; give them "
                           "through the environment (AWS_ACCESS_KEY_ID, a profile or a role)")
    if url.startswith("s3://"):
        from s3fs import S3FileSystem

        client_kwargs = {k: v for k, v in (("endpoint_url", s.endpoint_url), ("region_name", s.region)) if v}
        fs = S3FileSystem(
            anon=s.anonymous,
            client_kwargs=client_kwargs,
            config_kwargs={"connect_timeout": 10, "retries": {"max_attempts": 4, "mode": "standard"}},
            use_listings_cache=False,  # other processes (Ray actors) write the same prefixes
        )
        return fs, url.removeprefix("s3://")
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def arrow_filesystem(url: str):
    """(pyarrow filesystem, path) for Arrow-native readers and writers, from the same settings."""
    import pyarrow.fs as pafs

    if url.startswith("s3://"):
        kwargs: dict = {"anonymous": _settings.anonymous}
        if _settings.endpoint_url:
            scheme, _, host = _settings.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host, scheme=scheme)
        if _settings.region:
            kwargs["region"] = _settings.region
        return pafs.S3FileSystem(**kwargs), url.removeprefix("s3://")
    if is_local(url):
        return pafs.LocalFileSystem(), local_path(url)
    fs, path = filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """Absolute local path of a local URL (Ray Train and similar APIs want plain paths)."""
    if not is_local(url):
        raise StorageError(f"{url}: a local path is needed here")
    return os.path.abspath(url.removeprefix("file://"))


def _errors(fn: Callable, writes: bool = False) -> Callable:
    """Turn a storage call's low-level failures into one-line errors that name the URL.

    Unreachable endpoints and missing credentials (botocore) and unwritable or blocked local paths
    become StorageError; a missing object read stays FileNotFoundError, with the URL in the message.
    """

    @functools.wraps(fn)
    def wrapper(url: str, *args, **kwargs):
        try:
            return fn(url, *args, **kwargs)
        except StorageError:
            raise
        except FileNotFoundError as e:
            if writes:
                raise StorageError(f"cannot write {url}: {e.strerror or e}") from None
            if url in str(e):
                raise
            raise FileNotFoundError(f"{url} does not exist ({e.strerror or e})") from None
        except PermissionError as e:
            raise StorageError(f"cannot access {url}: permission denied ({e.strerror or e})") from None
        except OSError as e:
            raise StorageError(f"cannot access {url}: {e.strerror or e}") from None
        except Exception as e:
            if type(e).__module__.startswith("botocore"):
                where = _settings.endpoint_url or "AWS S3"
                raise StorageError(f"cannot reach {where} for {url}: {str(e).splitlines()[0]}") from None
            raise

    return wrapper


def _write_errors(fn: Callable) -> Callable:
    """`_errors` for calls that write: a missing parent is a StorageError, not a missing object."""
    return _errors(fn, writes=True)


_known_buckets: set[tuple[str | None, str]] = set()


def _require_bucket(fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
    """Object stores have no folders to create, but the bucket must exist: never create one."""
    bucket = path.split("/", 1)[0]
    if (_settings.endpoint_url, bucket) in _known_buckets:
        return
    try:  # not fs.exists, which answers False for an endpoint it cannot reach
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise StorageError(f"bucket {bucket!r} does not exist (for {url}); create it or fix the URL") from None
    _known_buckets.add((_settings.endpoint_url, bucket))


@_errors
def require_location(url: str) -> None:
    """Raise naming what is missing when `url` does not exist: its bucket (on an object store, where
    `exists` answers False for a missing bucket as for a missing key) or the location itself."""
    fs, path = filesystem(url)
    if "s3" in fs.protocol:
        _require_bucket(fs, path, url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{url} does not exist")


def _makedirs(fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
    if "s3" in fs.protocol:
        _require_bucket(fs, path, url)
    else:
        fs.makedirs(path, exist_ok=True)


@_errors
def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


@_errors
def isfile(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isfile(path)


@_write_errors
def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    _makedirs(fs, path, url)


@_errors
def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist") from None


@_errors
def digest(url: str) -> tuple[int, str]:
    """(size in bytes, sha256) of the file at `url`, streamed in 8 MiB chunks."""
    fs, path = filesystem(url)
    h, size = hashlib.sha256(), 0
    try:
        with fs.open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist") from None
    return size, h.hexdigest()


def read_json(url: str) -> dict:
    data = read_bytes(url)
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{url} is not valid JSON: {e}") from None


@contextmanager
def publish(url: str) -> Iterator[str]:
    """Yield a temporary local-or-remote path to write; on success it is moved to `url`.

    Readers never see a half-written file under the final name: a crash leaves only the temporary
    name behind, which resume ignores and overwrites.
    """
    fs, path = filesystem(url)  # `path` is absolute (a local name alone is in the working folder)
    if isinstance(fs, LocalFileSystem) and os.path.isdir(path):  # the move would put the file inside it
        raise StorageError(f"{url} is a folder; give a file name")
    parent = path.rsplit("/", 1)[0]
    tmp = f"{parent}/{TEMPORARY_PREFIX}{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
    _makedirs(fs, parent, url)
    try:
        yield tmp
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


@_write_errors
def write_bytes(url: str, data: bytes) -> None:
    fs, _ = filesystem(url)
    with publish(url) as tmp, fs.open(tmp, "wb") as f:
        f.write(data)


def write_json(url: str, obj: object) -> None:
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_file(url: str, write: Callable[[str], None]) -> None:
    """A file that a library writes to a local path (`write(path)`), published at `url`: moved into
    place through a temporary name, or uploaded to an object store."""
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, url.rstrip("/").rsplit("/", 1)[-1])
        write(local)
        put_file(local, url)


def put_file(local_file: str, url: str, keep_source: bool = False) -> None:
    """Upload or move a finished local file to `url` through a temporary name (`keep_source`
    copies instead of moving a local file)."""
    _put_file(url, local_file, keep_source)


@_write_errors
def _put_file(url: str, local_file: str, keep_source: bool = False) -> None:
    fs, _ = filesystem(url)
    with publish(url) as tmp:
        if not isinstance(fs, LocalFileSystem):
            fs.put_file(local_file, tmp)
        elif keep_source:
            shutil.copyfile(local_file, tmp)
        else:
            shutil.move(local_file, tmp)


@_errors
def listdir(url: str) -> list[str]:
    fs, path = filesystem(url)
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]


@_write_errors
def remove_tree(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@contextmanager
def local_copy(url: str, names: list[str] | None = None) -> Iterator[str]:
    """A local folder holding the files under `url` (or just those of `names` that exist): the
    folder itself when local, otherwise a temporary download that is removed on exit."""
    if is_local(url):
        yield local_path(url)
        return
    with tempfile.TemporaryDirectory(prefix="factory-") as d:
        _download(url, d, names)
        yield d


@_errors
def _download(url: str, local_dir: str, names: list[str] | None) -> None:
    fs, path = filesystem(url)
    if names is None:
        files = [f for f in fs.find(path) if not f.rsplit("/", 1)[-1].startswith(TEMPORARY_PREFIX)]
    else:
        files = [f"{path}/{n}" for n in names if fs.exists(f"{path}/{n}")]
    for remote in files:
        local = os.path.join(local_dir, os.path.relpath(remote, path))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fs.get_file(remote, local)


FETCH_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "factory", "fetched")
"""Where `fetch` keeps local copies of remote files (one folder per URL)."""


def fetch(url: str, cache_dir: str | None = None) -> str:
    """A local path holding the file at `url`: the path itself when local, else a copy downloaded once
    into `cache_dir` (default FETCH_CACHE) and reused while the remote file keeps its size and version
    (ETag / modification time). Readers that need a real file (pickles, safetensors) call this first."""
    if is_local(url):
        path = local_path(url)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{url} {'is a folder, not a file' if os.path.isdir(path) else 'does not exist'}")
        return path
    return _fetch(url, cache_dir or FETCH_CACHE)


@_errors
def _fetch(url: str, cache_dir: str) -> str:
    fs, path = filesystem(url)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise StorageError(f"{url} is a folder, a file is needed here")
    version = {k: str(info.get(k)) for k in ("size", "ETag", "LastModified", "mtime") if info.get(k) is not None}
    folder = os.path.join(cache_dir, hashlib.sha256(url.encode()).hexdigest()[:24])
    local, stamp = os.path.join(folder, path.rsplit("/", 1)[-1]), os.path.join(folder, ".source.json")
    try:
        with open(stamp) as f:
            if json.load(f) == {"url": url, **version} and os.path.isfile(local):
                return local
    except (OSError, ValueError):
        pass
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}")
    try:
        fs.get_file(path, tmp)
        os.replace(tmp, local)  # concurrent fetches of one URL each publish a whole file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with open(f"{stamp}.{uuid.uuid4().hex}", "w") as f:
        json.dump({"url": url, **version}, f)
    os.replace(f.name, stamp)
    return local


def publish_tree(local_dir: str, url: str, ignore: Callable | None = None, last: str | None = None) -> None:
    """Publish the files of a local folder as the folder `url`, so no reader sees it half-written.

    Locally the folder is copied under a temporary name beside `url` and swapped in with renames.
    On object stores, where folders are prefixes, each file goes through a temporary name and `last`
    (a file name readers check for, e.g. a model's weights) is removed first and written last.
    `ignore` is a `shutil.ignore_patterns` filter of files to leave out."""
    if is_local(url):
        _publish_local_tree(local_dir, local_path(url), ignore)
        return
    names = [n for n in sorted(os.listdir(local_dir), key=lambda n: n == last)
             if not (ignore and n in ignore(local_dir, [n]))]
    if last is not None:
        remove_tree(join(url, last))
    for name in names:
        put_file(os.path.join(local_dir, name), join(url, name), keep_source=True)


@_write_errors
def _publish_local_tree(local_dir: str, target: str, ignore: Callable | None) -> None:
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}-{name}")
    shutil.copytree(local_dir, staging, ignore=ignore)
    old = None
    if os.path.exists(target):
        old = os.path.join(parent, f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}-old-{name}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
