"""The whole GAN slice through the CLI on a local Ray cluster: export, label, import, train on
Ray Train, generate on Ray Data, read the Parquet back with pyarrow, resume, refuse, inspect."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from factory.cli import main
from factory.dataset.sample import decode_png
from factory.toy.annotator import annotate_by_rule

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_cluster):
    work = tmp_path_factory.mktemp("e2e")
    config = work / "factory.yaml"
    config.write_text(
        f"workdir: {work}\n"
        "annotate: {num_images: 10}\n"
        "decoder: {num_heads: 4}\n"
        "train: {num_workers: 2, steps: 60, checkpoint_every: 30, val_images: 2}\n"
        "generate: {num_samples: 120, shard_size: 50, batch_size: 16, num_actors: 2, cpus_per_actor: 0.5,\n"
        "           formats: [parquet, webdataset]}\n"
    )
    args = [str(config)]
    assert main(["annotate", "export", *args]) == 0
    annotate_by_rule(str(work / "annotations"))
    assert main(["annotate", "import", *args]) == 0
    assert main(["train", *args]) == 0
    assert main(["generate", *args]) == 0
    return work, args


def test_dataset_reads_back_with_pyarrow(built):
    work, _ = built
    manifest = json.loads((work / "dataset" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_generated"] == 120 and manifest["num_shards"] == 3
    assert [s["generated"] for s in manifest["shards"]] == [50, 50, 20]
    kept = manifest["num_samples"]
    assert kept == sum(s["count"] for s in manifest["shards"]) and 105 <= kept <= 111  # ~10% dropped
    calibration = manifest["calibration"]
    assert calibration["drop_fraction"] == 0.1 and calibration["num_scored"] == 120
    assert manifest["labels"] == ["background", "blue"] and manifest["formats"] == ["parquet", "webdataset"]
    assert manifest["config"]["generate"]["num_samples"] == 120 and manifest["package_version"]
    table = pq.read_table(work / "dataset" / "parquet")
    assert table.num_rows == kept and max(table.column("uncertainty").to_pylist()) <= calibration["threshold"]
    assert set(table.column("seed").to_pylist()) <= set(range(1_000_000, 1_000_120))
    assert len(set(table.column("key").to_pylist())) == kept
    tars = sorted(p.name for p in (work / "dataset" / "webdataset").iterdir())
    assert tars == [f"shard-0000{i}.{ext}" for i in range(3) for ext in ("meta.parquet", "tar")]
    assert set(table.column("config_hash").to_pylist()) == {manifest["config_hash"]}
    row = table.slice(0, 1).to_pylist()[0]
    image, mask = decode_png(row["image"]), decode_png(row["mask"])
    assert image.shape == (32, 32, 3) and mask.shape == (32, 32) and mask.dtype == np.uint8
    assert len(row["latent"]) == 64 and 0 <= row["uncertainty"] <= np.log(2)
    for record in manifest["shards"]:
        for file in record["files"]:
            assert (work / "dataset" / file["path"]).stat().st_size == file["bytes"]
    card = (work / "dataset" / "README.md").read_text()  # the card: what made it, from the decoder's metrics.json
    trained = json.loads((work / "train" / "interpreter" / "decoder" / "metrics.json").read_text())
    assert trained["labeled_set"]["fingerprint"] in card and trained["labeled_set"]["images"] == 10
    assert "val_miou" in trained["metrics"] and "factory generate" in card and manifest["config_hash"] in card
    assert (work / "dataset" / "preview.png").is_file()


def test_decoder_checkpoint_carries_config_and_labels(built):
    work, _ = built
    decoder = work / "train" / "interpreter" / "decoder"
    assert json.loads((decoder / "labels.json").read_text())["labels"] == ["background", "blue"]
    assert "num_heads: 4" in (decoder / "config.yaml").read_text()


def test_rerun_is_a_noop_and_resume_rebuilds_identically(built):
    work, args = built
    shard = work / "dataset" / "parquet" / "shard-00001.parquet"
    tar = work / "dataset" / "webdataset" / "shard-00001.tar"
    before = shard.read_bytes(), tar.read_bytes()
    manifest = work / "dataset" / "manifest.json"
    mtimes = shard.stat().st_mtime_ns, manifest.stat().st_mtime_ns
    assert main(["generate", *args]) == 0
    assert (shard.stat().st_mtime_ns, manifest.stat().st_mtime_ns) == mtimes  # a finished build: no-op
    os.remove(work / "dataset" / "_stats" / "shard-00001.json")  # as if the build died mid-shard
    shard.unlink()
    (work / "dataset" / "webdataset" / ".tmp-0a1b-shard-00001.tar").write_bytes(b"half a tar")
    assert main(["generate", *args]) == 0
    assert (shard.read_bytes(), tar.read_bytes()) == before
    assert not [p for p in (work / "dataset" / "webdataset").iterdir() if p.name.startswith(".tmp-")]


def test_a_corrupted_finished_shard_is_caught_and_rebuilt(built, tmp_path, capsys):
    """A shard file truncated or altered after its completion record: inspect and validation name it;
    a re-run does not trust the record, rebuilds that shard to the same bytes and re-publishes the
    manifest only when all match."""
    import shutil

    from factory.dataset.validate import ValidationError, validate

    work, args = built
    copy = tmp_path / "copy"
    shutil.copytree(work / "dataset", copy)
    parquet, tar = copy / "parquet" / "shard-00000.parquet", copy / "webdataset" / "shard-00002.tar"
    good = parquet.read_bytes(), tar.read_bytes()
    parquet.write_bytes(good[0][: len(good[0]) // 2])  # truncated
    flipped = bytearray(good[1])
    flipped[700] ^= 0xFF  # one byte inside a member: same size, other bytes
    tar.write_bytes(bytes(flipped))
    assert main(["inspect", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN    parquet/shard-00000.parquet has" in out and "BROKEN    webdataset/shard-00002.tar does not match" in out
    with pytest.raises(ValidationError, match="shard-00000.parquet has .* bytes.*shard-00002.tar does not match"):
        validate(str(copy))
    assert main(["generate", *args, f"generate.output={copy}"]) == 0
    assert (parquet.read_bytes(), tar.read_bytes()) == good
    capsys.readouterr()
    assert main(["inspect", str(copy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["complete"]


def test_train_rerun_resumes_from_its_checkpoint(built):
    from factory.config import ConfigError, load_config
    from factory.fingerprint import safetensors_fingerprint
    from factory.recipes.train import train

    work, args = built
    decoder = str(work / "train" / "interpreter" / "decoder" / "model.safetensors")
    before = safetensors_fingerprint(decoder)
    done = train(load_config(args[0]))  # already at train.steps: restores, trains nothing, re-publishes
    assert done["start_step"] == 60 and done["step"] == 60
    assert safetensors_fingerprint(decoder) == before
    assert main(["generate", *args]) == 0  # the same decoder: the dataset is still this config's
    more = train(load_config(args[0], ["train.steps=90"]))  # continues from step 60, not from 0
    assert more["start_step"] == 60 and more["step"] == 90
    assert safetensors_fingerprint(decoder) != before
    with pytest.raises(ConfigError, match="^run 'interpreter' .* other inputs: train.lr changed since"):  # the driver's
        train(load_config(args[0], ["train.lr=0.01"]))


def test_different_config_into_same_output_is_refused(built, capsys):
    _, args = built
    assert main(["generate", *args, "backbone.psi=0.5"]) == 2
    assert "different config" in capsys.readouterr().err


def test_inspect_summarizes_and_draws(built, capsys):
    work, _ = built
    assert main(["inspect", str(work / "dataset"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 105 <= summary["num_samples"] <= 111 and summary["complete"]
    assert sum(summary["uncertainty"]["histogram"]["counts"]) == summary["num_samples"]
    assert abs(sum(summary["class_pixel_frequency"].values()) - 1) < 1e-3
    assert summary["missing_files"] == [] and summary["formats"] == ["parquet", "webdataset"]
    with Image.open(summary["preview"]) as im:
        assert im.width >= 4 * 256 and im.mode == "RGB"
    assert main(["inspect", str(work / "dataset")]) == 0
    text = capsys.readouterr().out
    assert "kept of 120 generated" in text and "were dropped:" in text


def test_inspect_reports_missing_files_and_unfinished_builds(built, tmp_path, capsys):
    import shutil

    work, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(work / "dataset", copy)
    (copy / "webdataset" / "shard-00002.tar").unlink()
    assert main(["inspect", str(copy), "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["missing_files"] == ["webdataset/shard-00002.tar"] and not summary["complete"]
    (copy / "manifest.json").unlink()  # as a build that is still running, or was killed
    (copy / "_stats" / "shard-00001.json").unlink()
    assert main(["inspect", str(copy), "--html", str(tmp_path / "report.html")]) == 1
    out = capsys.readouterr().out
    assert "NO MANIFEST" in out and "2 of 3 shards done" in out and "missing   shard-00001" in out
    assert "report    not written" in out and not (tmp_path / "report.html").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate: {num_sampels: 3}\n")
    assert main(["generate", str(bad)]) == 2
    assert "num_sampels" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main(["inspect", str(tmp_path), "--samples", "0"])
    assert e.value.code == 2 and "--samples: must be >= 1, got 0" in capsys.readouterr().err


def _load_job(name):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_entry_points_run_the_same_recipes(built):
    from factory.config import load_config

    work, args = built
    cfg = load_config(args[0], [f"generate.output={work}/job-dataset", "generate.num_samples=30"])
    manifest = _load_job("generate").main(cfg)
    assert manifest["complete"] and manifest["num_generated"] == 30
    assert pq.read_table(work / "job-dataset" / "parquet").num_rows == manifest["num_samples"]
    assert callable(_load_job("train_decoder").main)


def test_generate_to_s3_on_loopback(built, s3_bucket, s3_endpoint):
    from factory.dataset import layout, read

    work, args = built
    out = f"{s3_bucket}/datasets/v1"
    assert main(["generate", *args, f"generate.output={out}", "generate.num_samples=60",
                 f"storage.endpoint_url={s3_endpoint}", "storage.region=us-east-1"]) == 0
    tables = list(read.shard_tables(out))
    assert [t.num_rows for t in tables] == [s["count"] for s in layout.read_manifest(out)["shards"]]
    assert sum(t.num_rows for t in tables) >= 50
    assert main(["inspect", out, "--json", "--endpoint-url", s3_endpoint, "--region", "us-east-1"]) == 0


@pytest.mark.parametrize("case", ["unreachable endpoint", "missing bucket", "unwritable path"])
def test_bad_storage_gives_a_one_line_error(built, s3_endpoint, case, capsys):
    work, args = built
    (work / "a-file").write_text("not a folder")
    overrides = {
        "unreachable endpoint": ["generate.output=s3://bucket/ds", "storage.endpoint_url=http://127.0.0.1:9"],
        "missing bucket": ["generate.output=s3://no-such-bucket/ds", f"storage.endpoint_url={s3_endpoint}"],
        "unwritable path": [f"generate.output={work}/a-file/ds"],
    }[case]
    assert main(["generate", *args, *overrides, "storage.region=us-east-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("factory: error: ")
    assert {"unreachable endpoint": "cannot reach http://127.0.0.1:9 for s3://bucket/ds",
            "missing bucket": "bucket 'no-such-bucket' does not exist",
            "unwritable path": f"cannot access {work}/a-file/ds"}[case] in err


def test_train_checkpoints_and_decoder_on_s3(built, s3_bucket, s3_endpoint):
    from factory.dataset import layout, read

    work, args = built
    s3 = [f"storage.endpoint_url={s3_endpoint}", "storage.region=us-east-1",
          f"train.storage_path={s3_bucket}/runs", "train.steps=10", "train.checkpoint_every=5"]
    assert main(["train", *args, *s3]) == 0
    assert storage_listing(f"{s3_bucket}/runs/interpreter/decoder") == ["config.yaml", "labels.json", "metrics.json",
                                                                         "model.safetensors"]
    assert any(n.startswith("checkpoint") for n in storage_listing(f"{s3_bucket}/runs/interpreter"))
    out = f"{s3_bucket}/from-s3-decoder"
    assert main(["generate", *args, *s3, f"generate.output={out}", "generate.num_samples=20"]) == 0
    assert layout.read_manifest(out)["num_generated"] == 20
    assert sum(t.num_rows for t in read.shard_tables(out)) == layout.read_manifest(out)["num_samples"]


def storage_listing(url):
    from factory import storage

    return sorted(storage.listdir(url))
