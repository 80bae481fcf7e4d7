"""The diffusion path through the CLI on the session's Ray cluster and loopback S3: a labeled folder
of real (toy-world) images -> labels import -> train on Ray Train -> generate from a prompt file on
Ray Data into both formats on S3 -> read back by our readers and the ecosystems' own."""

import json
import os

import numpy as np
import pytest

from factory.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_cluster, s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="dm-e2e")
    work = tmp_path_factory.mktemp("dm")
    config = work / "dm.yaml"
    root = os.path.join(os.path.dirname(__file__), "..", "configs", "diffusion.yaml")
    config.write_text(open(root).read())
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("a photo of a face with red hair\n# a comment\na bald face smiling on a blue background\n\n"
                           "a face with blond hair\n")
    args = [str(config), f"workdir={work}", f"labels.dir={work}/labeled", "train.steps=40",
            "train.checkpoint_every=20", "decoder.tasks=[segmentation,depth,instances]", "decoder.num_heads=3",
            f"prompts.source={prompt_file}", "generate.output=s3://dm-e2e/dataset", "generate.num_samples=24",
            "generate.shard_size=12", "generate.calibration_samples=24", "generate.cpus_per_actor=0.5",
            "generate.formats=[parquet,webdataset]", f"storage.endpoint_url={s3_endpoint}", "storage.region=us-east-1"]
    assert main(["toyworld", str(work / "labeled"), "--num-images", "24"]) == 0
    assert main(["labels", "import", *args]) == 0
    assert main(["train", *args]) == 0
    assert main(["generate", *args]) == 0
    return work, args


def test_generated_samples_carry_prompts_masks_depth_and_instances(built):
    from factory import storage
    from factory.config import StorageConfig
    from factory.dataset.read import iter_samples, open_dataset

    work, args = built
    endpoint = args[-2].split("=", 1)[1]
    storage.configure(StorageConfig(endpoint_url=endpoint, region="us-east-1"))
    url, manifest = open_dataset("s3://dm-e2e/dataset")
    assert manifest["complete"] and manifest["num_generated"] == 24 and manifest["tasks"] == [
        "segmentation", "depth", "instances"]
    assert manifest["labels"] == ["background", "skin", "hair", "eye", "brow", "nose", "mouth", "ear"]
    kept = manifest["num_samples"]
    assert 19 <= kept <= 23  # ~10% dropped as most uncertain
    prompts = ["a photo of a face with red hair", "a bald face smiling on a blue background", "a face with blond hair"]
    by_format = {}
    for fmt in ("parquet", "webdataset"):
        samples = list(iter_samples(url, fmt=fmt))
        assert len(samples) == kept
        for s in samples:
            assert s["prompt"] == prompts[(s["seed"] - 1_000_000) % 3]  # seed i takes prompt i mod 3
            assert s["guidance"] == 7.5 and s["steps"] == 10 and s["config_hash"] == manifest["config_hash"]
            assert s["image"].shape == (64, 64, 3) and s["mask"].shape == (64, 64) and s["mask"].max() < 8
            assert s["depth"].dtype == np.float32 and s["depth"].shape == (64, 64) and s["depth"].min() > 0
            assert s["depth_scale"] == 1000.0 and s["instances"].shape == (64, 64)
            ids = sorted(int(i) for i in np.unique(s["instances"]) if i)
            assert ids == [item["id"] for item in s["instance_classes"]]
            assert all(item["class"] in manifest["labels"] for item in s["instance_classes"])
        by_format[fmt] = {s["key"]: s for s in samples}
    assert by_format["parquet"].keys() == by_format["webdataset"].keys()
    key = next(iter(by_format["parquet"]))
    a, b = by_format["parquet"][key], by_format["webdataset"][key]
    assert np.array_equal(a["depth"], b["depth"]) and np.array_equal(a["image"], b["image"])


def test_the_dataset_keeps_its_prompts_and_a_rerun_is_a_noop(built):
    from factory import storage
    from factory.config import StorageConfig

    work, args = built
    endpoint = args[-2].split("=", 1)[1]
    storage.configure(StorageConfig(endpoint_url=endpoint, region="us-east-1"))
    lines = storage.read_bytes("s3://dm-e2e/dataset/prompts.jsonl").decode().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == [
        "a photo of a face with red hair", "a bald face smiling on a blue background", "a face with blond hair"]
    before = storage.read_bytes("s3://dm-e2e/dataset/manifest.json")
    assert main(["generate", *args]) == 0
    assert storage.read_bytes("s3://dm-e2e/dataset/manifest.json") == before
    assert main(["generate", *args, "prompts.source=null"]) == 2  # other prompts: a different dataset


def test_webdataset_reads_back_with_its_own_reader(built, tmp_path):
    import webdataset as wds

    from factory import storage
    from factory.config import StorageConfig

    work, args = built
    storage.configure(StorageConfig(endpoint_url=args[-2].split("=", 1)[1], region="us-east-1"))
    local = tmp_path / "shard.tar"
    local.write_bytes(storage.read_bytes("s3://dm-e2e/dataset/webdataset/shard-00000.tar"))
    samples = list(wds.WebDataset(str(local), shardshuffle=False).decode("rgb8"))
    assert samples and {"png", "seg.png", "depth.png", "inst.png", "json"} <= set(samples[0])
    meta = samples[0]["json"]
    assert meta["prompt"] and meta["depth_scale"] == 1000.0
