"""The dataset card: README.md at a finished dataset's root that `datasets.load_dataset(<folder>)`
reads with no arguments, with provenance, label statistics, the filter and the weights' licence
(non-commercial for weights from an official NVIDIA pickle, a warning when unknown)."""

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import save_untrained_decoder
from lookalike import canary_source, snapshot, with_noise_const

from factory.backbones.provenance import weights_provenance
from factory.backbones.stylegan2 import StyleGAN2Generator
from factory.backbones.stylegan2_formats import convert
from factory.config import SHIPPED_DIR, load_config
from factory.dataset import card, layout, read
from factory.decoders.files import load_decoder
from factory.recipes.dataset_card import publish_card
from factory.recipes.labeling import build_shard


def build(work, formats: str, *overrides: str, build_hash: str = "b" * 64, metrics: dict | None = None):
    """Two shards built without Ray and the card published as `generate` does (manifest last);
    `metrics`: a metrics.json beside the decoder, as `factory train` writes."""
    cfg = load_config(None, [f"workdir={work}", "decoder.num_heads=2", "generate.batch_size=5",
                             f"generate.formats=[{formats}]", *overrides])
    backbone = save_untrained_decoder(cfg)
    if metrics is not None:
        with open(os.path.join(cfg.generate.decoder, "metrics.json"), "w") as f:
            json.dump(metrics, f)
    decoder = load_decoder(cfg.generate.decoder)
    out = cfg.generate.output
    layout.prepare_output(out, "build", {}, overwrite=False)
    plan = layout.plan_shards(100, 10, 5)
    records = {s.name: build_shard(backbone, decoder, cfg, s, "cfg") for s in plan}
    manifest = layout.build_manifest(
        plan, records, {}, name="card-test", package_version="0.1.0", build_hash=build_hash, config_hash="c" * 64,
        task="segmentation", tasks=["segmentation"], labels=cfg.labels.classes, formats=cfg.generate.formats,
        image_format="png", calibration={"drop_fraction": 0.1, "threshold": 0.25, "num_scored": 10,
                                         "score_quantiles": {"p50": 0.2, "p90": 0.25}}, config=cfg_dict(cfg))
    publish_card(cfg, manifest, command="factory generate my.yaml")
    layout.write_manifest(out, manifest)
    return cfg, out


def cfg_dict(cfg):
    from factory.config import to_dict

    return to_dict(cfg)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return str(tmp_path / "hf-cache")


def test_load_dataset_reads_a_built_dataset_through_its_card(tmp_path, hf_offline):
    import datasets

    _, out = build(tmp_path, "parquet,webdataset")
    text = open(f"{out}/README.md").read()
    meta = front_matter(text)
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "parquet/*.parquet"}]
    assert meta["task_categories"] == ["image-segmentation"] and meta["size_categories"] == ["n<1K"]
    assert meta["license"] == "apache-2.0"  # seeded random weights made by factory itself
    ds = datasets.load_dataset(out, split="train", cache_dir=hf_offline)  # no arguments but the folder
    ours = list(read.iter_samples(out))
    assert ds["key"] == [s["key"] for s in ours] and len(ours) == 10
    np.testing.assert_array_equal(np.asarray(ds[3]["image"]), ours[3]["image"])
    np.testing.assert_array_equal(np.asarray(ds[3]["mask"]), ours[3]["mask"])
    # the body: preview, pixel shares, provenance, the filter, the readers
    assert "![the first samples" in text and (tmp_path / "dataset" / "preview.png").is_file()
    assert "| 0 | background |" in text and "threshold" not in meta
    assert "0.25000" in text and "factory generate my.yaml" in text and "c" * 64 in text
    for reader in ("ShardDataset", "ray.data.read_parquet", "wds.WebDataset", "load_dataset"):
        assert reader in text


def test_two_builds_in_folders_of_one_name_each_load_their_own_rows(tmp_path, hf_offline):
    """`datasets` caches a folder's rows by its name, config name and data_files patterns: the
    config is named after the build, so a second build in another `.../dataset` is not served the
    first one's rows from the cache."""
    import datasets

    _, first = build(tmp_path / "a", "parquet", build_hash="1" * 64)
    _, second = build(tmp_path / "b", "parquet", "backbone.init_seed=5", build_hash="2" * 64)
    assert first.endswith("/dataset") and second.endswith("/dataset")
    for out in (first, second):
        ds = datasets.load_dataset(out, split="train", cache_dir=hf_offline)
        np.testing.assert_array_equal(np.asarray(ds[0]["image"]), next(read.iter_samples(out))["image"])
    assert front_matter(Path(second, "README.md").read_text())["configs"][0]["config_name"] == "build-222222222222"


def test_a_webdataset_only_dataset_loads_its_tars_through_the_card(tmp_path, hf_offline):
    import datasets

    _, out = build(tmp_path, "webdataset")
    assert front_matter(open(f"{out}/README.md").read())["configs"][0]["data_files"][0]["path"] == "webdataset/*.tar"
    ds = datasets.load_dataset(out, split="train", cache_dir=hf_offline)
    assert ds["__key__"] == [f"{s:012d}" for s in range(100, 110)] and ds[0]["json"]["seed"] == 100


def test_a_webdataset_card_declares_its_features_so_empty_instance_lists_load(tmp_path, hf_offline):
    """`datasets` would type `instance_classes` from the first tar's first samples: with none found
    there it typed the list as null and failed on the next shard's; the card declares the types."""
    import dataclasses

    import datasets

    from factory.decoders.files import keypoint_names, read_decoder_metadata

    cfg = load_config("configs/diffusion.yaml", [
        f"workdir={tmp_path}", "backbone.weights=pkg://toy_diffusion", "backbone.diffusion.resolution=32",
        "backbone.diffusion.steps=2", "decoder.num_heads=2", "generate.batch_size=6",
        "decoder.tasks=[segmentation,instances]", "generate.formats=[webdataset]"])
    backbone = save_untrained_decoder(cfg)
    decoder = load_decoder(cfg.generate.decoder)
    out = cfg.generate.output
    layout.prepare_output(out, "build", {}, overwrite=False)
    plan, records = layout.plan_shards(0, 12, 6), {}
    for spec, threshold in zip(plan, (0.999999, 1e-6)):  # no instance in the first shard, some in the second
        decoder.cfg = dataclasses.replace(decoder.cfg, instance_threshold=threshold)
        records[spec.name] = build_shard(backbone, decoder, cfg, spec, "cfg", texts=["a photo of a face"])
    manifest = layout.build_manifest(plan, records, {}, name="wds", package_version="0.1.0", build_hash="d" * 64,
                                     config_hash="c", task="segmentation", tasks=["segmentation", "instances"],
                                     labels=cfg.labels.classes, keypoints=keypoint_names(read_decoder_metadata(
                                         cfg.generate.decoder)), formats=["webdataset"], image_format="png",
                                     calibration=None, config=cfg_dict(cfg))
    publish_card(cfg, manifest)
    layout.write_manifest(out, manifest)
    ds = datasets.load_dataset(out, split="train", cache_dir=hf_offline)
    ours = list(read.iter_samples(out))
    assert [r["json"]["instance_classes"] for r in ds][:6] == [[]] * 6
    assert [len(r["json"]["instance_classes"]) for r in ds] == [len(s["instance_classes"]) for s in ours]
    assert any(len(s["instance_classes"]) for s in ours[6:])
    np.testing.assert_array_equal(np.asarray(ds[7]["inst.png"]), ours[7]["instances"])
    np.testing.assert_array_equal(np.asarray(ds[7]["seg.png"]), ours[7]["mask"])
    assert ds[7]["json"]["prompt"] == "a photo of a face" and ds[7]["__key__"] == ours[7]["key"]


def test_unknown_weights_licence_warns_and_the_card_says_so(tmp_path, caplog):
    weights = tmp_path / "my_g.safetensors"
    shutil.copy(f"{SHIPPED_DIR}/toy_stylegan2.safetensors", weights)
    with caplog.at_level(logging.WARNING):
        _, out = build(tmp_path, "parquet", f"backbone.weights={weights}", "backbone.stylegan2.channel_max=64")
    assert "licence of backbone weights" in caplog.text and "card.weights_license" in caplog.text
    text = open(f"{out}/README.md").read()
    assert front_matter(text)["license"] == "unknown" and "**Unknown.**" in text
    # the file's sha256 is in the provenance; setting the licence silences the warning
    assert weights_provenance(load_config(None, [f"backbone.weights={weights}"]).backbone)["sha256"] in text


def test_weights_from_an_official_nvidia_pickle_make_a_non_commercial_card(tmp_path):
    g = with_noise_const(StyleGAN2Generator(load_config(None, []).backbone.stylegan2, seed=3, w_avg_samples=16))
    pickle_path = tmp_path / "network-snapshot.pkl"
    pickle_path.write_bytes(snapshot(g, canary_source(str(tmp_path / "CANARY"))))
    converted = str(tmp_path / "converted.safetensors")
    convert(str(pickle_path), converted)
    for weights in (str(pickle_path), converted):  # the pickle itself, and its conversion
        b = weights_provenance(load_config(None, [f"backbone.weights={weights}"]).backbone)
        assert b["nvidia_official"], weights
        licence = card.weights_license(b, "mit")  # whatever the config says
        assert licence["non_commercial"] and "Non-commercial" in licence["text"]
    assert not (tmp_path / "CANARY").exists()
    shipped = weights_provenance(load_config(None, ["backbone.weights=pkg://toy_stylegan2.safetensors"]).backbone)
    assert shipped["shipped"] and not shipped["nvidia_official"] and shipped["source"]["trained_by"]
    meta = card.front_matter({"formats": ["parquet"], "task": "segmentation", "name": "x", "num_samples": 20_000, "build_hash": "f" * 64,
                              "config": {}}, card.weights_license(b, None), None)
    assert meta["license"] == "other" and meta["license_name"] == card.NVIDIA_NC
    assert meta["size_categories"] == ["10K<n<100K"]


def test_label_statistics_of_each_task():
    from factory.dataset.stats import label_statistics

    mask = np.array([[0, 1], [1, 1]], np.uint8)
    seg = label_statistics([{"mask": mask}] * 3, ["bg", "part"], "segmentation")
    assert seg == {"class_pixel_frequency": {"bg": 0.25, "part": 0.75}, "samples_counted": 3}
    kps = [{"keypoints": [{"name": "nose", "score": 0.5}]}, {"keypoints": [{"name": "nose", "score": 1.0}]}]
    assert label_statistics(kps, ["nose", "chin"], "keypoints") == {
        "keypoint_mean_score": {"nose": 0.75, "chin": None}, "samples_counted": 2}
    assert label_statistics([{"mask": None, "keypoints": None}], ["bg"], "depth") == {"samples_counted": 0}


def test_keypoints_carry_their_own_names_not_the_classes(tmp_path):
    """A perception decoder predicts keypoints beside its classes: every sample names them as
    labels.keypoints does, in order, the manifest records them, and the card counts them."""
    from factory.decoders.files import keypoint_names, read_decoder_metadata

    names = ["left_eye", "right_eye", "nose"]
    cfg = load_config("configs/diffusion.yaml", [
        f"workdir={tmp_path}", "backbone.weights=pkg://toy_diffusion", "backbone.diffusion.resolution=32",
        "backbone.diffusion.steps=2", "decoder.num_heads=2", "generate.batch_size=4", "decoder.tasks=[keypoints]",
        f"labels.keypoints=[{','.join(names)}]"])
    backbone = save_untrained_decoder(cfg)
    meta = read_decoder_metadata(cfg.generate.decoder)
    assert keypoint_names(meta) == names and load_decoder(cfg.generate.decoder).keypoint_names == names
    out = cfg.generate.output
    layout.prepare_output(out, "build", {}, overwrite=False)
    spec = layout.plan_shards(0, 4, 4)[0]
    record = build_shard(backbone, load_decoder(cfg.generate.decoder), cfg, spec, "cfg", texts=["a photo of a face"])
    manifest = layout.build_manifest([spec], {spec.name: record}, {}, name="kp", package_version="0.1.0",
                                     build_hash="b", config_hash="c", task="keypoints", tasks=["keypoints"],
                                     labels=cfg.labels.classes, keypoints=keypoint_names(meta), formats=["parquet"],
                                     image_format="png", calibration=None, config=cfg_dict(cfg))
    assert layout.task_labels(manifest) == names
    publish_card(cfg, manifest)
    samples = list(read.iter_samples(out, manifest=manifest))
    assert len(samples) == 4 and all([k["name"] for k in s["keypoints"]] == names for s in samples)
    text = Path(out, "README.md").read_text()
    assert "| 0 | left_eye |" in text and "| 2 | nose |" in text and "| 0 | background |" not in text
    # an interpreter fitted for keypoints predicts them as its labels; a segmentation one predicts none
    interp = {"decoder": '{"kind": "interpreter", "task": "keypoints"}', "labels": '["nose", "chin"]'}
    assert keypoint_names(interp) == ["nose", "chin"]
    assert keypoint_names({**interp, "decoder": '{"kind": "interpreter", "task": "segmentation"}'}) == []
    assert keypoint_names({"decoder": '{"kind": "perception", "tasks": ["segmentation"]}', "labels": '["bg"]',
                           "keypoint_names": '["nose"]'}) == []


def test_a_diffusion_dataset_card_has_depth_and_its_pipeline(tmp_path, hf_offline):
    """The DatasetDM path: depth as an image feature, the pipeline folder and its training record."""
    import datasets

    from factory.config import to_dict

    cfg = load_config("configs/diffusion.yaml", [
        f"workdir={tmp_path}", "backbone.weights=pkg://toy_diffusion", "backbone.diffusion.resolution=32",
        "backbone.diffusion.steps=2", "decoder.num_heads=2", "generate.batch_size=4"])
    backbone = save_untrained_decoder(cfg)
    out = cfg.generate.output
    layout.prepare_output(out, "build", {}, overwrite=False)
    spec = layout.plan_shards(0, 4, 4)[0]
    record = build_shard(backbone, load_decoder(cfg.generate.decoder), cfg, spec, "cfg", texts=["a photo of a face"])
    manifest = layout.build_manifest([spec], {spec.name: record}, {}, name="dm", package_version="0.1.0",
                                     build_hash="b", config_hash="c", task="segmentation",
                                     tasks=["segmentation", "depth"], labels=cfg.labels.classes, formats=["parquet"],
                                     image_format="png", calibration=None, config=to_dict(cfg))
    publish_card(cfg, manifest)
    layout.write_manifest(out, manifest)
    text = open(f"{out}/README.md").read()
    meta = front_matter(text)
    assert meta["task_categories"] == ["depth-estimation", "image-segmentation"] and "datasetdm" in meta["tags"]
    assert meta["license"] == "apache-2.0" and "diffusers pipeline folder (shipped with factory)" in text
    assert "factory pretrain configs/toy_dm.yaml" in text and "Nothing was dropped" in text
    ds = datasets.load_dataset(out, split="train", cache_dir=hf_offline)
    depth = np.asarray(ds[0]["depth"])
    assert depth.shape == (32, 32) and depth.dtype in (np.uint16, np.int32)
    np.testing.assert_allclose(depth / cfg.labels.depth_scale, next(read.iter_samples(out))["depth"], rtol=1e-6)


def test_the_filter_section_says_what_was_dropped_and_when_scores_cannot_rank():
    calibration = {"drop_fraction": 0.1, "threshold": 0.0, "num_scored": 32,
                   "score_quantiles": {"p10": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}}
    alike = {"calibration": calibration, "num_generated": 32, "num_samples": 32}
    flat = "\n".join(card.filter_section(alike))
    assert "do not vary" in flat and "no sample was dropped" in flat and "were dropped:" not in flat
    assert card.filter_sentence(alike).startswith("Nothing was dropped: the scores of the first 32 seeds do not vary")
    ranked = {**calibration, "threshold": 0.25, "score_quantiles": {"p10": 0.1, "p50": 0.2, "p90": 0.25, "p99": 0.3}}
    text = "\n".join(card.filter_section({"calibration": ranked, "num_generated": 40, "num_samples": 36}))
    assert "Samples scoring above **0.25000** were dropped: 4 of 40 (10%)" in text and "not exactly it" in text
    assert card.filter_sentence({"calibration": ranked, "num_generated": 40, "num_samples": 36}) == (
        "Samples scoring above 0.25000 were dropped: 4 of 40 (10%; generate.drop_uncertain=0.1 set the threshold at "
        "that quantile of the first 32 seeds' scores).")
    realised = card.filter_sentence({"calibration": ranked, "num_generated": 60, "num_samples": 48})
    assert "12 of 60 (20%" in realised and "most uncertain" not in realised  # the share dropped, not the target
    assert card.filter_sentence({"calibration": None, "num_generated": 4, "num_samples": 4}).startswith("Nothing")


def test_the_reading_snippets_name_a_file_url_by_its_path():
    text = "\n".join(card.reading_section({"formats": ["parquet"]}, "file:///data/my ds"))
    assert 'datasets.load_dataset("/data/my ds", split="train")' in text and "file://" not in text
    assert 'ray_dataset("/data/my ds")' in text


def test_the_webdataset_recipe_of_a_remote_dataset_says_how_to_reach_its_tars():
    text = "\n".join(card.reading_section({"formats": ["webdataset"]}, "s3://bucket/ds"))
    assert "not local files" in text and "pipe:aws s3 cp URL -" in text
    assert "not local files" not in "\n".join(card.reading_section({"formats": ["webdataset"]}, "/data/ds"))


def test_a_card_does_not_offer_the_tar_loader_that_fails_on_an_empty_first_tar():
    shards = [{"count": 0}, {"count": 5}]
    text = "\n".join(card.reading_section({"formats": ["parquet", "webdataset"], "shards": shards}, "/data/ds"))
    assert 'load_dataset("webdataset"' not in text and "left the first tar here empty" in text
    text = "\n".join(card.reading_section({"formats": ["parquet", "webdataset"], "shards": shards[::-1]}, "/data/ds"))
    assert 'datasets.load_dataset("webdataset", data_files="/data/ds/webdataset/*.tar")' in text


def test_a_webdataset_only_card_gives_the_ray_reader_its_format_and_names_the_members_written():
    text = "\n".join(card.reading_section({"formats": ["webdataset"]}, "/data/ds"))
    assert 'ray_dataset("/data/ds", format="webdataset")' in text and 'ray_dataset("/data/ds")' not in text
    manifest = {"formats": ["webdataset"], "tasks": ["segmentation", "depth"], "image_format": "webp",
                "config": {"backbone": {"kind": "diffusion"}, "labels": {"depth_scale": 1000.0}}}
    text = "\n".join(card.reading_section(manifest, "/data/ds"))
    assert "members `KEY.webp`, `KEY.seg.png`, `KEY.depth.png`, `KEY.json`" in text and "KEY.png" not in text
    assert "parquet/shard" not in text and "`prompts.jsonl`" in text and "empty_check=False" in text
    assert "metres x `depth_scale` (1000 in this build" in text
