"""Content hashes: identify weights and labeled sets by what they hold, not by their file bytes.

safetensors writes its metadata map in no fixed order, so two saves of the same tensors can differ
byte for byte; resume and dataset identity must not depend on that. Tensors are hashed by name, dtype,
shape and raw bytes as stored, one at a time, so hashing a multi-GB file never holds a second copy of
it, and a model's hash does not depend on the dtype it later runs in. Hashes of weight files on
disk are cached beside them (`cached_hash`), keyed by each file's size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open

log = logging.getLogger(__name__)

CACHE_FILE = ".factory-hash.json"
"""Written beside hashed weights (inside a weights folder, or `.<file>.factory-hash.json`)."""


def _update(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bfloat16 included


def tensors_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        _update(h, name, tensors[name])
    h.update(json.dumps(metadata or {}, sort_keys=True).encode())
    return h.hexdigest()


def state_hash(module: torch.nn.Module) -> str:
    """Identifies a module's weights whatever file they came from."""
    return tensors_hash(module.state_dict())


def safetensors_fingerprint(path: str, with_metadata: bool = True) -> str:
    """Hash of a safetensors file's tensors (and metadata), independent of serialization order; equal
    to `tensors_hash` of the same tensors and metadata. Reads one tensor at a time."""
    h = hashlib.sha256()
    try:
        with safe_open(path, "pt") as f:
            for name in sorted(f.keys()):
                _update(h, name, f.get_tensor(name))
            metadata = (f.metadata() or {}) if with_metadata else {}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt): {e}") from None
    h.update(json.dumps(metadata, sort_keys=True).encode())
    return h.hexdigest()


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in blocks (the identity of a source file that is not ours,
    e.g. a checkpoint a conversion record names)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical_json(path: str) -> bytes:
    """A JSON file's content without the keys that record who wrote it (`_diffusers_version`,
    `_name_or_path`, `name_or_path`...), in a canonical form."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if not k.startswith("_") and k != "name_or_path"}
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def files_hash(root: str, files: Iterable[str]) -> str:
    """Hash of the files under `root` (relative paths): safetensors by their tensors, JSON canonically,
    anything else by its bytes."""
    h = hashlib.sha256()
    for rel in sorted(files):
        path = os.path.join(root, rel)
        h.update(f"\0{rel}\0".encode())
        if rel.endswith(".safetensors"):
            h.update(safetensors_fingerprint(path, with_metadata=False).encode())
        elif rel.endswith(".json"):
            h.update(canonical_json(path))
        else:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _stamp(paths: list[str]) -> list[list]:
    out = []
    for p in sorted(paths):
        st = os.stat(p)
        out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


def cached_hash(key_files: list[str], cache_dir: str, cache_name: str, compute: Callable[[], str]) -> str:
    """`compute()`, remembered in `cache_dir/cache_name` (else under ~/.cache/factory when that folder
    is not writable) for as long as `key_files` keep their sizes and modification times."""
    stamp = _stamp(key_files)
    fallback = os.path.join(os.path.expanduser("~"), ".cache", "factory", "hashes",
                            hashlib.sha256(os.path.abspath(os.path.join(cache_dir, cache_name)).encode()).hexdigest()
                            + ".json")
    for path in (os.path.join(cache_dir, cache_name), fallback):
        try:
            with open(path) as f:
                record = json.load(f)
            if record.get("files") == stamp:
                return record["hash"]
        except (OSError, ValueError, AttributeError):
            continue
    value = compute()
    for path in (os.path.join(cache_dir, cache_name), fallback):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"files": stamp, "hash": value}, f)
            os.replace(tmp, path)
            break
        except OSError:
            log.debug("cannot cache a hash in %s", path)
    return value
