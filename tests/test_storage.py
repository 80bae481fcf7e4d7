"""Storage on local paths and on a real S3-protocol server (moto, loopback): the same calls."""

import pyarrow.parquet as pq
import pytest

from factory import storage
from factory.dataset import layout, read, writers


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
    spec = layout.ShardSpec(0, 10, 13)
    layout.prepare_output(root, "h", {}, overwrite=False)
    [w] = writers.open_writers(root, spec, ["parquet"])
    for seed in spec.seeds:
        w.write({"key": f"{seed:012d}", "seed": seed, "shard": 0, "latent": [0.0], "psi": 1.0, "width": 1,
                 "height": 1, "image": b"i", "mask": None, "keypoints": None, "uncertainty": 0.5,
                 "config_hash": "h"})
    record = {"count": w.count, "files": w.close(), "bytes": 0}
    layout.write_completion(root, spec, record)
    layout.write_manifest(root, {"format": layout.FORMAT, "formats": ["parquet"], "shards": [record]})
    assert [t.num_rows for t in read.shard_tables(root)] == [3]
    fs, path = storage.arrow_filesystem(storage.join(root, "parquet", "shard-00000.parquet"))
    assert pq.read_table(path, filesystem=fs).column("seed").to_pylist() == [10, 11, 12]
    assert layout.read_completion(root, spec)["count"] == 3


def test_publish_tree_replaces_a_folder_whole(root, tmp_path):
    import shutil

    for version in ("one", "two"):
        src = tmp_path / f"src-{version}"
        src.mkdir()
        (src / "model.bin").write_text(version)
        (src / "notes.txt").write_text(f"notes {version}")
        (src / "state.pt").write_text("private")
        storage.publish_tree(str(src), storage.join(root, "decoder"), ignore=shutil.ignore_patterns("state.pt"),
                             last="model.bin")
        assert sorted(storage.listdir(storage.join(root, "decoder"))) == ["model.bin", "notes.txt"]
        assert storage.read_bytes(storage.join(root, "decoder", "model.bin")) == version.encode()
        assert (src / "model.bin").exists()  # the source is copied, never moved
    assert storage.listdir(root) == ["decoder"]  # no temporary left beside it


def test_a_bare_file_name_is_written_in_the_working_folder(tmp_path, monkeypatch):
    """`factory inspect DS --html report.html`: the file itself, not a folder of that name."""
    monkeypatch.chdir(tmp_path)
    storage.write_bytes("report.html", b"<html></html>")
    assert (tmp_path / "report.html").read_bytes() == b"<html></html>" and sorted(p.name for p in tmp_path.iterdir()) == [
        "report.html"]


def test_a_file_written_over_a_folder_is_refused_naming_it(tmp_path):
    """`factory inspect DS --html out/`: the report went inside the folder under a temporary name."""
    (tmp_path / "out").mkdir()
    with pytest.raises(storage.StorageError, match=r"out is a folder; give a file name"):
        storage.write_bytes(str(tmp_path / "out"), b"<html></html>")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_dataset_that_is_not_there_is_named_as_missing_not_as_unfinished(tmp_path, s3_bucket):
    from factory.dataset import layout

    with pytest.raises(FileNotFoundError, match=r"nope does not exist$"):
        layout.read_manifest(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no manifest.json: not a finished factory dataset"):
        layout.read_manifest(str(tmp_path / "empty"))
    with pytest.raises(storage.StorageError, match=r"bucket 'no-such-bucket-x' does not exist \(for s3://no-such-bucket-x/ds\)"):
        layout.read_manifest("s3://no-such-bucket-x/ds")
    with pytest.raises(FileNotFoundError, match=r"/ds does not exist$"):
        layout.read_manifest(f"{s3_bucket}/ds")


@pytest.mark.parametrize("url", ["s3://AKIAEXAMPLE:se/cr+et@bucket/data", "s3://AKIAEXAMPLE:secret@bucket/data",
                                 "s3://someone@bucket/data"])
def test_credentials_in_a_url_are_refused_without_repeating_them(url):
    with pytest.raises(storage.StorageError, match=r"s3://\*\*\*@bucket/data: credentials in a URL are refused") as e:
        storage.filesystem(url)
    assert "secret" not in str(e.value) and "se/cr" not in str(e.value)


@pytest.mark.parametrize("url", ["s3://bucket/t=12:00/x@y", "file:///tmp/run:1/ds@latest"])
def test_colons_and_at_signs_inside_a_path_are_no_credentials(url):
    assert storage.filesystem(url)[1].endswith(url.rpartition("/")[2])
