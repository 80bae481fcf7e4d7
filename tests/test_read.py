"""Readers: our own (both formats, local and loopback S3, split across ranks and DataLoader workers)
and the ecosystems' (webdataset, HF datasets, Ray Data, pyarrow) reading the shards unchanged."""

import glob
import json
import os

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from conftest import save_untrained_decoder
from torch.utils.data import DataLoader

from factory import storage
from factory.config import StorageConfig
from factory.dataset import layout, read, sample
from factory.decoders.files import load_decoder
from factory.recipes.labeling import build_shard

NUM_SHARDS, SHARD_SIZE = 5, 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """5 shards x 6 samples in both formats, with a manifest as `generate` writes it (no Ray)."""
    from factory.config import load_config

    work = tmp_path_factory.mktemp("read")
    cfg = load_config(None, [f"workdir={work}", "decoder.num_heads=2", "generate.batch_size=6",
                             "generate.formats=[parquet,webdataset]"])
    backbone = save_untrained_decoder(cfg)
    decoder = load_decoder(cfg.generate.decoder)
    out = cfg.generate.output
    layout.prepare_output(out, "build", {}, overwrite=False)
    records = [build_shard(backbone, decoder, cfg, spec, "cfg")
               for spec in layout.plan_shards(100, NUM_SHARDS * SHARD_SIZE, SHARD_SIZE)]
    layout.write_manifest(out, {
        "format": layout.FORMAT, "build_hash": "build", "config_hash": "cfg", "task": "segmentation",
        "labels": ["background", "blue"], "formats": ["parquet", "webdataset"],
        "num_samples": NUM_SHARDS * SHARD_SIZE, "num_shards": NUM_SHARDS, "complete": True,
        "shards": records, "failed": [],
    })
    return out


ALL_KEYS = [f"{seed:012d}" for seed in range(100, 100 + NUM_SHARDS * SHARD_SIZE)]


def test_both_formats_decode_to_the_same_samples(dataset):
    from_parquet = list(read.iter_samples(dataset, fmt="parquet"))
    from_tars = list(read.iter_samples(dataset, fmt="webdataset"))
    assert [s["key"] for s in from_parquet] == [s["key"] for s in from_tars] == ALL_KEYS
    for a, b in zip(from_parquet, from_tars):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
        assert a["image"].shape == (32, 32, 3) and a["mask"].dtype == np.uint8
        assert (a["seed"], a["uncertainty"], a["config_hash"]) == (b["seed"], b["uncertainty"], b["config_hash"])
        np.testing.assert_allclose(a["latent"], b["latent"])


def test_round_trip_through_loopback_s3(dataset, s3_bucket):
    for path in glob.glob(f"{dataset}/**/*", recursive=True):
        if os.path.isfile(path):
            storage.put_file(path, storage.join(s3_bucket, os.path.relpath(path, dataset)))
    local = {s["key"]: s for s in read.iter_samples(dataset)}
    for fmt in ("parquet", "webdataset"):
        remote = list(read.iter_samples(s3_bucket, fmt=fmt))
        assert [s["key"] for s in remote] == ALL_KEYS
        np.testing.assert_array_equal(remote[7]["image"], local[remote[7]["key"]]["image"])
        images, masks, meta = next(iter(DataLoader(read.ShardDataset(s3_bucket, format=fmt), batch_size=4)))
        assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 32, 32) and masks.dtype == torch.int64
        assert meta["key"] == ALL_KEYS[:4]


def test_each_reader_reads_with_its_own_storage_settings(dataset, monkeypatch):
    """Two readers of datasets on different endpoints, read in turn in one process (a train and a val
    loader zipped), each read with its own settings: one process-wide setting let the second's
    endpoint serve the first's later shards."""
    from factory.config import StorageConfig

    used = []
    real = storage.filesystem
    monkeypatch.setattr(storage, "filesystem", lambda url, settings=None: used.append(
        (url, (settings or storage.current()).endpoint_url)) or real(url, settings))
    a = read.ShardDataset(dataset, storage_cfg=StorageConfig(endpoint_url="http://a:9000"))
    b = read.ShardDataset(dataset, storage_cfg=StorageConfig(endpoint_url="http://b:9000"))
    default = read.ShardDataset(dataset)
    assert default.storage_cfg == StorageConfig()  # not the last reader's endpoint
    used.clear()
    for (_, _, ma), (_, _, mb) in zip(a, b):
        assert ma["key"] == mb["key"]
    shards = [endpoint for url, endpoint in used if url.endswith(".parquet")]
    assert shards[::2] == ["http://a:9000"] * NUM_SHARDS and shards[1::2] == ["http://b:9000"] * NUM_SHARDS


def test_a_shuffled_epoch_reaches_workers_that_persist_across_epochs(dataset):
    """`set_epoch` in the main process: DataLoader workers kept alive between epochs
    (`persistent_workers=True`) read the new epoch's order too."""
    orders = {}
    for persistent in (False, True):
        ds = read.ShardDataset(dataset, shuffle=True, seed=3)
        loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=persistent)
        orders[persistent] = []
        for epoch in range(3):
            ds.set_epoch(epoch)
            orders[persistent].append([meta["key"] for _, _, meta in loader])
    assert orders[True] == orders[False] and len({tuple(o) for o in orders[True]}) == 3


def keys_seen(url, ranks, workers, **kwargs):
    seen = []
    for rank in range(ranks):
        ds = read.ShardDataset(url, rank=rank, world_size=ranks, **kwargs)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        seen.append([meta["key"] for _, _, meta in loader])
    return seen


@pytest.mark.parametrize("ranks,workers", [(1, 2), (2, 2), (4, 2), (4, 3), (7, 1)])
def test_every_rank_takes_as_many_samples_and_none_twice(dataset, ranks, workers):
    """DDP ranks must take the same number of steps: each rank reads N // ranks samples, the
    readers' parts are disjoint, and only the last N mod ranks of the epoch's order sit out."""
    seen = keys_seen(dataset, ranks, workers=workers)
    flat = [k for part in seen for k in part]
    assert {len(part) for part in seen} == {len(ALL_KEYS) // ranks}
    assert len(flat) == len(set(flat)) and sorted(flat) == ALL_KEYS[: len(flat)]


def test_a_reader_left_with_nothing_to_read_says_so(dataset):
    with pytest.warns(UserWarning, match=rf"{len(ALL_KEYS)} samples for {len(ALL_KEYS) + 1} ranks: every rank reads none"):
        assert list(read.ShardDataset(dataset, rank=0, world_size=len(ALL_KEYS) + 1)) == []
    with pytest.warns(UserWarning, match=r"0 samples scoring at most max_uncertainty=-1.0 for 1 ranks"):
        read.ShardDataset(dataset, max_uncertainty=-1.0)


def test_shuffle_is_deterministic_per_epoch_and_filtering_splits_what_is_kept(dataset):
    ds = read.ShardDataset(dataset, shuffle=True, seed=3)
    first = [m["key"] for _, _, m in ds]
    assert first == [m["key"] for _, _, m in read.ShardDataset(dataset, shuffle=True, seed=3)]
    ds.set_epoch(1)
    second = [m["key"] for _, _, m in ds]
    assert sorted(first) == sorted(second) == ALL_KEYS and first != second
    scores = {s["key"]: s["uncertainty"] for s in read.iter_samples(dataset)}
    cut = float(np.median(list(scores.values())))
    below = [k for k in ALL_KEYS if scores[k] <= cut]
    assert [m["key"] for _, _, m in read.ShardDataset(dataset, max_uncertainty=cut)] == below
    for fmt in ("parquet", "webdataset"):  # 3 ranks: equal parts of what is kept, in order
        seen = keys_seen(dataset, 3, workers=2, max_uncertainty=cut, format=fmt)
        assert {len(part) for part in seen} == {len(below) // 3}
        assert sorted(k for part in seen for k in part) == below[: 3 * (len(below) // 3)]


def as_stored(data: bytes) -> np.ndarray:
    """The README's webdataset decoder for label maps: the PNG's own values (class ids, 16-bit depth)."""
    import io

    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)))


def test_webdataset_reads_the_tars(dataset):
    import webdataset as wds

    tars = sorted(glob.glob(f"{dataset}/webdataset/*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode(
        wds.handle_extension("seg.png depth.png inst.png", as_stored), "rgb8"))  # as README and the card say
    assert samples[0]["seg.png"].flags.writeable  # torch's collate takes it without a warning
    assert [s["__key__"] for s in samples] == ALL_KEYS
    ours = next(read.iter_samples(dataset))
    np.testing.assert_array_equal(samples[0]["png"], ours["image"])
    np.testing.assert_array_equal(samples[0]["seg.png"], ours["mask"])
    assert samples[0]["json"]["seed"] == 100 and samples[0]["seg.png"].shape[:2] == (32, 32)


def test_hf_datasets_read_both_formats(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    parquet = datasets.load_dataset("parquet", data_files=sorted(glob.glob(f"{dataset}/parquet/*.parquet")),
                                    split="train", cache_dir=str(tmp_path / "cache"))
    assert parquet["key"] == ALL_KEYS
    tars = datasets.load_dataset("webdataset", data_files=sorted(glob.glob(f"{dataset}/webdataset/*.tar")),
                                 split="train", cache_dir=str(tmp_path / "cache"))
    assert tars["__key__"] == ALL_KEYS
    ours = next(read.iter_samples(dataset))
    np.testing.assert_array_equal(np.array(tars[0]["png"]), ours["image"])
    assert tars[0]["json"]["seed"] == 100


def test_pyarrow_reads_the_parquet(dataset):
    table = pq.read_table(f"{dataset}/parquet")
    assert sorted(table.column("key").to_pylist()) == ALL_KEYS and table.schema.equals(sample.SAMPLE_SCHEMA)
    meta = pads.dataset(sorted(glob.glob(f"{dataset}/webdataset/*.meta.parquet"))).to_table()
    assert meta.column("key").to_pylist() == ALL_KEYS and meta.schema.equals(sample.META_SCHEMA)


@pytest.mark.integration
def test_ray_data_reads_both_formats(dataset, ray_cluster):
    import ray

    rows = ray.data.read_parquet(f"{dataset}/parquet").select_columns(["key"]).take_all()
    assert sorted(r["key"] for r in rows) == ALL_KEYS
    # the metadata Parquet sits beside each tar, so a folder read names the extension
    tars = ray.data.read_webdataset(f"{dataset}/webdataset", decoder=None, file_extensions=["tar"]).take_all()
    assert sorted(r["__key__"] for r in tars) == ALL_KEYS
    assert json.loads(tars[0]["json"])["seed"] in range(100, 130)
    assert read.ray_dataset(dataset).count() == len(ALL_KEYS)


@pytest.mark.integration
def test_ray_dataset_on_loopback_s3(dataset, s3_bucket, ray_cluster):
    for path in glob.glob(f"{dataset}/**/*", recursive=True):
        if os.path.isfile(path):
            storage.put_file(path, storage.join(s3_bucket, os.path.relpath(path, dataset)))
    ds = read.ray_dataset(s3_bucket)
    assert sorted(r["key"] for r in ds.select_columns(["key"]).take_all()) == ALL_KEYS
    tars = read.ray_dataset(s3_bucket, format="webdataset").take_all()
    assert sorted(r["__key__"] for r in tars) == ALL_KEYS


def test_errors_name_the_dataset_and_format(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no manifest.json"):
        read.ShardDataset(str(tmp_path))
    manifest = json.loads(open(f"{dataset}/manifest.json").read())
    only_parquet = tmp_path / "only-parquet"
    only_parquet.mkdir()
    (only_parquet / "manifest.json").write_text(json.dumps({**manifest, "formats": ["parquet"]}))
    with pytest.raises(ValueError, match="written as parquet, not 'webdataset'"):
        read.ShardDataset(str(only_parquet), format="webdataset")
    with pytest.raises(ValueError, match="rank must be in"):
        read.ShardDataset(dataset, rank=2, world_size=2)
    storage.configure(StorageConfig())


@pytest.fixture(scope="module")
def diffusion_dataset(tmp_path_factory):
    """One shard of the diffusion path (depth, instances, prompts) in both formats, without Ray."""
    from factory.config import load_config

    work = tmp_path_factory.mktemp("read-dm")
    cfg = load_config("configs/diffusion.yaml", [
        f"workdir={work}", "backbone.diffusion.steps=2", "decoder.tasks=[segmentation,depth,instances]",
        "decoder.num_heads=2", "generate.batch_size=4", "generate.formats=[parquet,webdataset]"])
    backbone = save_untrained_decoder(cfg)
    decoder = load_decoder(cfg.generate.decoder)
    out = cfg.generate.output
    layout.prepare_output(out, "build", {}, overwrite=False)
    texts = ["a photo of a red thing", "a blue one"]
    record = build_shard(backbone, decoder, cfg, layout.plan_shards(0, 4, 4)[0], "cfg", texts=texts)
    layout.write_manifest(out, {
        "format": layout.FORMAT, "build_hash": "build", "config_hash": "cfg", "task": "segmentation+depth+instances",
        "tasks": ["segmentation", "depth", "instances"], "labels": cfg.labels.classes,
        "formats": ["parquet", "webdataset"], "num_samples": 4, "num_shards": 1, "complete": True,
        "shards": [record], "failed": [],
    })
    return out, texts


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_shard_dataset_yields_depth_and_instances_of_a_diffusion_dataset(diffusion_dataset, fmt):
    dataset, texts = diffusion_dataset
    samples = {s["key"]: s for s in read.iter_samples(dataset, fmt=fmt)}
    _, depth, meta = next(iter(DataLoader(read.ShardDataset(dataset, format=fmt, target="depth"), batch_size=4)))
    assert depth.dtype == torch.float32 and depth.shape == (4, 64, 64)
    for i, key in enumerate(meta["key"]):
        torch.testing.assert_close(depth[i], torch.from_numpy(samples[key]["depth"]))
        assert meta["prompt"][i] == texts[int(meta["seed"][i]) % len(texts)] == samples[key]["prompt"]
    assert (depth > 0).all()
    image, inst, meta = next(iter(read.ShardDataset(dataset, format=fmt, target="instances")))
    assert inst.dtype == torch.int64 and inst.shape == (64, 64)
    classes = json.loads(meta["instance_classes"])
    assert int(inst.max()) <= len(classes)
    assert all(c["class"] in read.open_dataset(dataset)[1]["labels"] for c in classes)
    _, mask, _ = next(iter(read.ShardDataset(dataset, format=fmt)))  # auto: the mask
    assert mask.shape == (64, 64) and mask.dtype == torch.int64
    if fmt == "webdataset":  # the README's webdataset recipe: depth in metres, ids as stored
        import webdataset as wds

        tars = sorted(glob.glob(f"{dataset}/webdataset/*.tar"))
        for s in wds.WebDataset(tars, shardshuffle=False).decode(
                wds.handle_extension("seg.png depth.png inst.png", as_stored), "rgb8"):
            ours = samples[s["__key__"]]
            np.testing.assert_allclose(s["depth.png"] / s["json"]["depth_scale"], ours["depth"], rtol=1e-6)
            np.testing.assert_array_equal(s["inst.png"], ours["instances"])
            np.testing.assert_array_equal(s["seg.png"], ours["mask"])


def test_shard_dataset_names_a_missing_target(dataset):
    with pytest.raises(ValueError, match="target must be one of"):
        read.ShardDataset(dataset, target="normals")
    with pytest.raises(ValueError, match=r"has no depth \(ShardDataset target='depth'"):
        next(iter(read.ShardDataset(dataset, target="depth")))
