"""Shard plan, the Parquet writer and the output claim, without Ray or models."""

import os

import pyarrow.parquet as pq
import pytest

from factory import shards


def test_plan_covers_the_seed_range_without_overlap():
    plan = shards.plan_shards(100, 25, 10)
    assert [(s.start_seed, s.stop_seed) for s in plan] == [(100, 110), (110, 120), (120, 125)]
    assert [s.name for s in plan] == ["shard-00000", "shard-00001", "shard-00002"]


def _row(seed):
    return {
        "key": f"{seed:012d}", "seed": seed, "shard": 0, "latent": [0.5, -1.0], "psi": 0.7, "width": 4,
        "height": 4, "image": b"png", "mask": None, "keypoints": None, "uncertainty": 0.25, "config_hash": "h",
    }


def test_parquet_writer_publishes_only_on_close(tmp_path):
    out = str(tmp_path / "ds")
    spec = shards.ShardSpec(3, 30, 35)
    w = shards.ParquetShardWriter(out, spec, rows_per_group=2)
    for seed in spec.seeds:
        w.write(_row(seed))
    assert not os.path.exists(f"{out}/shards/shard-00003.parquet")
    [record] = w.close()
    table = pq.read_table(f"{out}/shards/shard-00003.parquet")
    assert table.column("seed").to_pylist() == list(range(30, 35))
    assert table.schema.equals(shards.SAMPLE_SCHEMA)
    assert record["path"] == "shards/shard-00003.parquet" and record["bytes"] == os.path.getsize(
        f"{out}/shards/shard-00003.parquet"
    )
    assert not [f for f in os.listdir(f"{out}/shards") if f.startswith(".tmp")]


def test_same_rows_give_the_same_bytes(tmp_path):
    digests = []
    for name in ("a", "b"):
        w = shards.ParquetShardWriter(str(tmp_path / name), shards.ShardSpec(0, 0, 3))
        for seed in range(3):
            w.write(_row(seed))
        digests.append(w.close()[0]["sha256"])
    assert digests[0] == digests[1]


def test_output_claim_refuses_another_config(tmp_path):
    out = str(tmp_path / "ds")
    shards.prepare_output(out, "hash-a", {"x": 1}, overwrite=False)
    shards.prepare_output(out, "hash-a", {"x": 1}, overwrite=False)  # same config: resume
    with pytest.raises(FileExistsError, match="different config.*generate.overwrite=true"):
        shards.prepare_output(out, "hash-b", {"x": 2}, overwrite=False)
    shards.write_completion(out, shards.ShardSpec(0, 0, 1), {"count": 1})
    shards.prepare_output(out, "hash-b", {"x": 2}, overwrite=True)
    assert sorted(os.listdir(out)) == ["build.json", "shards"]
    assert shards.read_completion(out, shards.ShardSpec(0, 0, 1)) is None


def test_output_claim_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a factory dataset"):
        shards.prepare_output(str(tmp_path), "h", {}, overwrite=False)
    assert (tmp_path / "precious.txt").exists()


def test_manifest_errors_name_the_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        shards.read_manifest(str(tmp_path))
