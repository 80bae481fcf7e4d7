"""Shard plan, the Parquet and WebDataset writers and the output claim, without Ray or models."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from factory.dataset import layout, sample, writers


def test_plan_covers_the_seed_range_without_overlap():
    plan = layout.plan_shards(100, 25, 10)
    assert [(s.start_seed, s.stop_seed) for s in plan] == [(100, 110), (110, 120), (120, 125)]
    assert [s.name for s in plan] == ["shard-00000", "shard-00001", "shard-00002"]


PNG = sample.png(np.zeros((4, 4, 3), np.uint8))


def _row(seed):
    return {
        "key": f"{seed:012d}", "seed": seed, "shard": 0, "latent": [0.5, -1.0], "psi": 0.7, "width": 4,
        "height": 4, "image": PNG, "mask": None, "keypoints": None, "uncertainty": 0.25, "config_hash": "h",
    }


def test_parquet_writer_publishes_only_on_close(tmp_path):
    out = str(tmp_path / "ds")
    spec = layout.ShardSpec(3, 30, 35)
    [w] = writers.open_writers(out, spec, ["parquet"])
    w._rows_per_group = 2
    for seed in spec.seeds:
        w.write(_row(seed))
    assert not os.path.exists(f"{out}/parquet/shard-00003.parquet")
    [record] = w.close()
    table = pq.read_table(f"{out}/parquet/shard-00003.parquet")
    assert table.column("seed").to_pylist() == list(range(30, 35))
    assert table.schema.equals(sample.SAMPLE_SCHEMA)
    assert record["path"] == "parquet/shard-00003.parquet" and record["bytes"] == os.path.getsize(
        f"{out}/parquet/shard-00003.parquet"
    )
    assert not [f for f in os.listdir(f"{out}/parquet") if f.startswith(".tmp")]


def test_webdataset_writer_writes_a_tar_and_its_metadata(tmp_path):
    import json
    import tarfile

    out = str(tmp_path / "ds")
    spec = layout.ShardSpec(2, 20, 23)
    [w] = writers.open_writers(out, spec, ["webdataset"])
    for seed in spec.seeds:
        w.write({**_row(seed), "mask": b"seg", "keypoints": '[{"name": "nose", "x": 1.0, "y": 2.0, "score": 0.5}]'})
    assert not os.path.exists(f"{out}/webdataset/shard-00002.tar")
    tar_record, meta_record = w.close()
    assert [tar_record["path"], meta_record["path"]] == ["webdataset/shard-00002.tar",
                                                          "webdataset/shard-00002.meta.parquet"]
    with tarfile.open(f"{out}/webdataset/shard-00002.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:3]] == ["000000000020.png", "000000000020.seg.png", "000000000020.json"]
        assert len(members) == 9 and {(m.mtime, m.uid, m.mode) for m in members} == {(0, 0, 0o644)}
        meta = json.loads(tar.extractfile("000000000021.json").read())
        assert tar.extractfile("000000000021.seg.png").read() == b"seg"
    assert meta["seed"] == 21 and meta["latent"] == [0.5, -1.0] and meta["keypoints"][0]["name"] == "nose"
    assert "image" not in meta and "mask" not in meta
    table = pq.read_table(f"{out}/webdataset/shard-00002.meta.parquet")
    assert table.schema.equals(sample.META_SCHEMA) and table.column("key").to_pylist()[0] == "000000000020"


def test_keys_with_dots_are_refused(tmp_path):
    [w] = writers.open_writers(str(tmp_path), layout.ShardSpec(0, 0, 1), ["webdataset"])
    with pytest.raises(ValueError, match="'a.b' must not contain"):
        w.write({**_row(0), "key": "a.b"})
    w.abort()


def test_interrupted_writes_are_cleared_as_debris(tmp_path):
    out = str(tmp_path / "ds")
    os.makedirs(f"{out}/parquet")
    open(f"{out}/parquet/.tmp-0123-shard-00000.parquet", "wb").close()
    open(f"{out}/parquet/shard-00001.parquet", "wb").close()
    assert layout.remove_temporaries(out) == ["parquet/.tmp-0123-shard-00000.parquet"]
    assert os.listdir(f"{out}/parquet") == ["shard-00001.parquet"]


@pytest.mark.parametrize("fmt", layout.FORMATS)
def test_same_rows_give_the_same_bytes(tmp_path, fmt):
    digests = []
    for name in ("a", "b"):
        [w] = writers.open_writers(str(tmp_path / name), layout.ShardSpec(0, 0, 3), [fmt])
        for seed in range(3):
            w.write(_row(seed))
        digests.append([f["sha256"] for f in w.close()])
    assert digests[0] == digests[1]


def test_output_claim_refuses_another_config(tmp_path):
    out = str(tmp_path / "ds")
    layout.prepare_output(out, "hash-a", {"x": 1}, overwrite=False)
    layout.prepare_output(out, "hash-a", {"x": 1}, overwrite=False)  # same config: resume
    with pytest.raises(FileExistsError, match="different config.*generate.overwrite=true"):
        layout.prepare_output(out, "hash-b", {"x": 2}, overwrite=False)
    layout.write_completion(out, layout.ShardSpec(0, 0, 1), {"count": 1})
    layout.prepare_output(out, "hash-b", {"x": 2}, overwrite=True)
    assert sorted(os.listdir(out)) == ["build.json"]
    assert layout.read_completion(out, layout.ShardSpec(0, 0, 1)) is None


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_claim_refuses_a_foreign_folder_even_when_overwriting(tmp_path, overwrite):
    (tmp_path / "precious.txt").write_text("keep me")
    (tmp_path / "photos").mkdir()
    with pytest.raises(FileExistsError, match=r"not a factory dataset \(it holds photos, precious.txt; no build.json\)"
                                              r".*never another folder"):
        layout.prepare_output(str(tmp_path), "h", {}, overwrite=overwrite)
    assert (tmp_path / "precious.txt").read_text() == "keep me" and (tmp_path / "photos").is_dir()


def test_manifest_errors_name_the_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        layout.read_manifest(str(tmp_path))
