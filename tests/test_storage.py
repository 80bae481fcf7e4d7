"""Storage on local paths and on a real S3-protocol server (moto, loopback): the same calls."""

import pyarrow.parquet as pq
import pytest

from factory import read, shards, storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_json_and_bytes_round_trip(root):
    storage.write_json(storage.join(root, "a", "b.json"), {"x": [1, 2]})
    assert storage.read_json(storage.join(root, "a", "b.json")) == {"x": [1, 2]}
    assert storage.exists(storage.join(root, "a", "b.json"))
    assert storage.listdir(storage.join(root, "a")) == ["b.json"]
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        storage.read_bytes(storage.join(root, "missing.json"))


def test_failed_publish_leaves_nothing(root):
    url = storage.join(root, "half.bin")
    fs, _ = storage.filesystem(url)
    with pytest.raises(RuntimeError, match="boom"), storage.publish(url) as tmp:
        with fs.open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("boom")
    assert not storage.exists(url)
    assert (storage.listdir(root) if storage.exists(root) else []) == []  # no temporary left behind


def test_shard_round_trip_through_fsspec_and_arrow(root):
    spec = shards.ShardSpec(0, 10, 13)
    shards.prepare_output(root, "h", {}, overwrite=False)
    [w] = shards.open_writers(root, spec, ["parquet"])
    for seed in spec.seeds:
        w.write({"key": f"{seed:012d}", "seed": seed, "shard": 0, "latent": [0.0], "psi": 1.0, "width": 1,
                 "height": 1, "image": b"i", "mask": None, "keypoints": None, "uncertainty": 0.5,
                 "config_hash": "h"})
    record = {"count": w.count, "files": w.close(), "bytes": 0}
    shards.write_completion(root, spec, record)
    shards.write_manifest(root, {"format": shards.FORMAT, "formats": ["parquet"], "shards": [record]})
    assert [t.num_rows for t in read.shard_tables(root)] == [3]
    fs, path = storage.arrow_filesystem(storage.join(root, "parquet", "shard-00000.parquet"))
    assert pq.read_table(path, filesystem=fs).column("seed").to_pylist() == [10, 11, 12]
    assert shards.read_completion(root, spec)["count"] == 3
