"""Generation stages on hand-built inputs, without Ray: sample rows, shard bytes, determinism."""

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import save_untrained_decoder

from factory import config as config_lib
from factory.dataset import layout, sample
from factory.dataset.sample import decode_png
from factory.decoders.files import load_decoder
from factory.recipes.generate import sample_hash
from factory.recipes.labeling import build_shard, label_seeds


@pytest.fixture
def models(tiny_cfg):
    """The tiny backbone and an (untrained, seeded) decoder saved and loaded like a fitted one."""
    backbone = save_untrained_decoder(tiny_cfg)
    return backbone, load_decoder(tiny_cfg.generate.decoder)


def test_rows_match_the_schema_and_the_backbone(tiny_cfg, models):
    backbone, decoder = models
    rows = label_seeds(backbone, decoder, [7, 8, 9], shard=2, cfg=tiny_cfg, config_hash="abc")
    table = pa.Table.from_pylist(rows, schema=sample.SAMPLE_SCHEMA)
    assert table.num_rows == 3 and table.column("key").to_pylist() == ["000000000007", "000000000008", "000000000009"]
    batch = backbone([7, 8, 9])  # a sample is a function of its seed and its batch
    np.testing.assert_array_equal(decode_png(rows[1]["image"]), batch.images[1].numpy())
    np.testing.assert_array_equal(np.float32(rows[1]["latent"]), batch.latents[1].numpy())
    mask = decode_png(rows[1]["mask"])
    assert mask.shape == (32, 32) and mask.dtype == np.uint8 and mask.max() < len(tiny_cfg.labels.classes)
    assert all(0 <= r["uncertainty"] <= np.log(len(tiny_cfg.labels.classes)) + 1e-6 for r in rows)
    assert rows[0]["uncertainty"] != rows[1]["uncertainty"]


def test_a_rebuilt_shard_has_identical_bytes(tiny_cfg, models):
    backbone, decoder = models
    spec = layout.ShardSpec(1, 16, 32)
    first = build_shard(backbone, decoder, tiny_cfg, spec, "abc")
    path = f"{tiny_cfg.generate.output}/parquet/shard-00001.parquet"
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    second = build_shard(backbone, decoder, tiny_cfg, spec, "abc")
    assert first["files"] == second["files"] and first["files"][0]["sha256"] == digest
    assert first["count"] == 16 and first["start_seed"] == 16 and first["stop_seed"] == 32
    assert layout.read_completion(tiny_cfg.generate.output, spec)["count"] == 16


def test_sample_hash_tracks_what_the_bytes_depend_on(tiny_cfg, models):
    backbone, _ = models
    h = sample_hash(tiny_cfg, backbone.weights_hash, tiny_cfg.generate.decoder)
    assert h == sample_hash(tiny_cfg, backbone.weights_hash, tiny_cfg.generate.decoder)
    tiny_cfg.backbone.psi = 0.5
    assert h != sample_hash(tiny_cfg, backbone.weights_hash, tiny_cfg.generate.decoder)


def test_speed_ups_that_may_change_float_bits_are_part_of_the_sample_hash(tiny_cfg, models):
    """`generate.compile` and `generate.channels_last` can change a sample's last bits on a GPU, so an
    output built with one is not resumed without it; how many threads encode does not count."""
    backbone, _ = models
    hashes = set()
    for flags in [(), ("compile",), ("channels_last",), ("compile", "channels_last")]:
        for flag in ("compile", "channels_last"):
            setattr(tiny_cfg.generate, flag, flag in flags)
        hashes.add(sample_hash(tiny_cfg, backbone.weights_hash, tiny_cfg.generate.decoder))
    assert len(hashes) == 4
    tiny_cfg.generate.compile = tiny_cfg.generate.channels_last = False
    off = sample_hash(tiny_cfg, backbone.weights_hash, tiny_cfg.generate.decoder)
    tiny_cfg.generate.encode_threads += 1  # how samples are encoded in parallel does not change bytes
    assert sample_hash(tiny_cfg, backbone.weights_hash, tiny_cfg.generate.decoder) == off


def test_a_decoder_that_scores_nan_fails_its_batch_naming_the_seed(tiny_cfg, models):
    """NaN features or weights make every label garbage and the score NaN (a NaN threshold, bare NaN in
    JSON): the batch fails, naming the decoder and the seed, instead of being written."""
    import dataclasses

    backbone, decoder = models

    class NaNFeatures:
        def __getattr__(self, name):
            return getattr(backbone, name)

        def __call__(self, *args, **kwargs):
            out = backbone(*args, **kwargs)
            return dataclasses.replace(out, features=[f * float("nan") for f in out.features])

    with pytest.raises(ValueError, match=r"scores seed 7 \(and 2 more of this batch\) as NaN or infinite"):
        label_seeds(NaNFeatures(), decoder, [7, 8, 9], shard=0, cfg=tiny_cfg, config_hash="abc")


def test_a_failing_shard_is_retried_then_reported_not_dropped(tiny_cfg, models, monkeypatch):
    import json

    from factory.recipes import generate as generate_mod
    from factory.recipes import labeling

    real = labeling.build_shard
    calls = {0: 0, 1: 0}

    def flaky(backbone, decoder, cfg, spec, config_hash, threshold, texts=None):
        calls[spec.index] += 1
        if spec.index == 1 or calls[0] == 1:  # shard 0 fails once, shard 1 always
            raise OSError("disk full")
        return real(backbone, decoder, cfg, spec, config_hash, threshold, texts)

    monkeypatch.setattr(labeling, "build_shard", flaky)
    tiny_cfg.generate.max_retries = 2
    tiny_cfg.generate.drop_uncertain = 0  # no calibration pass: every shard is built directly
    builder = generate_mod.ShardBuilder(config_lib.to_dict(tiny_cfg), "abc", None)
    out = builder({"index": np.array([0, 1]), "start_seed": np.array([0, 16]), "stop_seed": np.array([16, 32])})
    first, second = (json.loads(r) for r in out["record"])
    assert first["count"] == 16 and "failed" not in first and calls[0] == 2
    assert second == {"shard": 1, "name": "shard-00001", "failed": "OSError: disk full", "attempts": 3}
    assert calls[1] == 3
    assert layout.read_completion(tiny_cfg.generate.output, layout.ShardSpec(1, 16, 32)) is None


def test_uncertain_samples_are_dropped_in_every_format(tiny_cfg, models):
    import pyarrow.parquet as pq

    backbone, decoder = models
    tiny_cfg.generate.formats = ["parquet", "webdataset"]
    spec = layout.ShardSpec(0, 0, 16)
    full = build_shard(backbone, decoder, tiny_cfg, spec, "abc")
    scores = pq.read_table(f"{tiny_cfg.generate.output}/parquet/shard-00000.parquet").column("uncertainty")
    threshold = float(np.quantile(scores.to_numpy(), 0.75))
    kept = build_shard(backbone, decoder, tiny_cfg, spec, "abc", threshold)
    assert full["count"] == full["generated"] == 16 and full["dropped"] == 0
    assert kept["generated"] == 16 and kept["count"] == 12 and kept["dropped"] == 4
    assert [f["path"] for f in kept["files"]] == [
        "parquet/shard-00000.parquet", "webdataset/shard-00000.tar", "webdataset/shard-00000.meta.parquet"]
    for path in ("parquet/shard-00000.parquet", "webdataset/shard-00000.meta.parquet"):
        table = pq.read_table(f"{tiny_cfg.generate.output}/{path}")
        assert table.num_rows == 12 and max(table.column("uncertainty").to_pylist()) <= threshold


def test_scores_match_the_stored_uncertainty(tiny_cfg, models):
    from factory.recipes.labeling import score_seeds

    backbone, decoder = models
    rows = label_seeds(backbone, decoder, [3, 4, 5], shard=0, cfg=tiny_cfg, config_hash="abc")
    assert score_seeds(backbone, decoder, [3, 4, 5]) == [r["uncertainty"] for r in rows]


def _files(output):
    import os

    return {os.path.relpath(os.path.join(d, f), output): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(output) for f in names if "_stats" not in d}


def test_a_staged_shard_finishes_to_the_bytes_of_a_direct_build(tiny_cfg, models, tmp_path):
    """The calibration pass makes a shard once, unfiltered; finishing it with the threshold writes
    exactly what building it directly with that threshold writes, in every format."""
    from factory.recipes.labeling import finish_staged, stage_shard

    backbone, decoder = models
    tiny_cfg.generate.formats = ["parquet", "webdataset"]
    spec = layout.ShardSpec(0, 0, 16)
    tiny_cfg.generate.output = str(tmp_path / "direct")
    staged_scores = stage_shard(backbone, decoder, tiny_cfg, spec, "abc")["scores"]
    threshold = float(np.quantile(staged_scores, 0.7))
    direct = build_shard(backbone, decoder, tiny_cfg, spec, "abc", threshold)  # finishes the staged shard
    assert "finish_staged_s" in direct["timings"] and layout.read_staged(tiny_cfg.generate.output, spec) is None
    tiny_cfg.generate.output = str(tmp_path / "fresh")
    fresh = build_shard(backbone, decoder, tiny_cfg, spec, "abc", threshold)
    assert "finish_staged_s" not in fresh["timings"]
    assert direct["files"] == fresh["files"] and direct["count"] == fresh["count"] < 16
    assert _files(str(tmp_path / "direct")) == _files(str(tmp_path / "fresh"))
    with pytest.raises(ValueError, match="staged for another config"):
        tiny_cfg.generate.output = str(tmp_path / "other")
        stage_shard(backbone, decoder, tiny_cfg, spec, "abc")
        finish_staged(tiny_cfg, spec, "xyz", threshold)


def test_encode_threads_change_no_byte(tiny_cfg, models, tmp_path):
    backbone, decoder = models
    tiny_cfg.generate.formats = ["parquet", "webdataset"]
    outputs = []
    for threads in (1, 3):
        tiny_cfg.generate.encode_threads = threads
        tiny_cfg.generate.output = str(tmp_path / f"threads-{threads}")
        build_shard(backbone, decoder, tiny_cfg, layout.ShardSpec(0, 0, 40), "abc")
        outputs.append(_files(tiny_cfg.generate.output))
    assert outputs[0] == outputs[1]


def test_any_sample_regenerates_from_its_batch(tiny_cfg, models):
    from factory.recipes.labeling import batch_of

    backbone, decoder = models
    g = tiny_cfg.generate  # shards of 16 seeds, batches of 8, from seed start_seed
    spec = layout.ShardSpec(1, g.start_seed + 16, g.start_seed + 32)
    build_shard(backbone, decoder, tiny_cfg, spec, "abc")
    stored = pq.read_table(f"{g.output}/parquet/shard-00001.parquet").to_pylist()
    seed = g.start_seed + 21
    assert batch_of(seed, g) == list(range(g.start_seed + 16, g.start_seed + 24))
    [row] = [r for r in label_seeds(backbone, decoder, batch_of(seed, g), 1, tiny_cfg, "abc") if r["seed"] == seed]
    assert row["image"] == stored[5]["image"] and row["mask"] == stored[5]["mask"]
    with pytest.raises(ValueError, match="not in this build"):
        batch_of(g.start_seed - 1, g)


@pytest.mark.parametrize("image_format, ext, lossless", [("png", "png", True), ("webp", "webp", False),
                                                         ("jpeg", "jpg", False)])
def test_image_codecs_keep_labels_lossless(tiny_cfg, models, image_format, ext, lossless):
    import tarfile

    from factory.dataset.read import iter_samples

    backbone, decoder = models
    tiny_cfg.generate.formats = ["parquet", "webdataset"]
    tiny_cfg.generate.image_format = image_format
    tiny_cfg.generate.image_quality = 90
    record = build_shard(backbone, decoder, tiny_cfg, layout.ShardSpec(0, 0, 4), "abc")
    layout.write_manifest(tiny_cfg.generate.output, {"format": layout.FORMAT, "formats": ["parquet", "webdataset"],
                                                     "shards": [record]})
    with tarfile.open(f"{tiny_cfg.generate.output}/webdataset/shard-00000.tar") as tar:
        assert tar.getnames()[:3] == [f"000000000000.{ext}", "000000000000.seg.png", "000000000000.json"]
    truth = backbone([0, 1, 2, 3])
    for fmt in ("parquet", "webdataset"):
        for i, s in enumerate(iter_samples(tiny_cfg.generate.output, fmt=fmt)):
            diff = np.abs(s["image"].astype(int) - truth.images[i].numpy().astype(int))
            assert (diff.max() == 0) == lossless and diff.mean() < 12
            assert s["mask"].dtype == np.uint8 and s["mask"].shape == (32, 32)


def test_training_regenerates_each_image_in_its_export_batch(tiny_cfg, labeled_dir):
    """Batched export: an image is regenerated with exactly the batch-mates it was exported with, even
    when the annotators skipped some of them, so its pixels match to the bit."""
    from factory.backbones import load_backbone
    from factory.data.annotations import load_labeled_set, pixels_sha256
    from factory.recipes import annotate
    from factory.recipes.objectives import regenerate

    with open(f"{labeled_dir}/skip.txt", "w") as f:
        f.write("00000002.png\n")
    import os

    os.remove(f"{labeled_dir}/masks/00000002.png")
    annotate.import_labels(tiny_cfg)
    labeled = load_labeled_set(tiny_cfg.train.labeled)
    assert labeled.batches == [list(range(8))] and 2 not in labeled.seeds.tolist()

    class Recorder:
        def __init__(self, backbone):
            self.backbone, self.calls = backbone, []

        def __call__(self, seeds, prompts=None):
            self.calls.append(list(seeds))
            return self.backbone(seeds, prompts)

    backbone = Recorder(load_backbone(tiny_cfg.backbone))
    features = regenerate(labeled, backbone)
    assert backbone.calls == [list(range(8))] and features[0].shape[0] == 7
    again = backbone.backbone(list(range(8))).images.numpy()
    assert [pixels_sha256(again[s]) for s in labeled.seeds.tolist()] == labeled.image_sha256


def test_an_output_that_is_a_file_is_refused_naming_it(tiny_cfg, tmp_path):
    from factory.recipes.generate import generate

    (tmp_path / "taken").write_text("a file")
    tiny_cfg.generate.output = str(tmp_path / "taken")
    with pytest.raises(FileExistsError, match=r"generate.output=.*taken is a file; a dataset is a folder"):
        generate(tiny_cfg)
    assert (tmp_path / "taken").read_text() == "a file"


def _fitted(kind: str, tasks: list[str], weights_hash: str = "a" * 64, features: tuple = ("f8",)) -> dict:
    """The metadata a fitted decoder of `kind` predicting `tasks` records (the parts generate checks)."""
    import json
    from dataclasses import asdict

    from factory.config import DecoderConfig

    cfg = DecoderConfig(kind=kind, task=tasks[0], tasks=tasks) if kind == "interpreter" else DecoderConfig(kind=kind, tasks=tasks)
    return {"decoder": json.dumps(asdict(cfg)), "backbone_hash": weights_hash, "feature_names": json.dumps(list(features))}


@pytest.mark.parametrize("fitted, asked", [
    (["segmentation", "depth"], ["segmentation", "depth", "keypoints"]),  # the manifest claimed keypoints
    (["segmentation", "depth", "instances", "keypoints"], ["segmentation"]),  # rows held unlisted labels
])
def test_a_config_asking_for_other_tasks_than_the_decoder_was_fitted_for_is_refused(fitted, asked):
    from factory.cli import _exit_code
    from factory.config import DecoderConfig
    from factory.recipes.generate import check_decoder_tasks

    meta = _fitted("perception", fitted)
    check_decoder_tasks(meta, DecoderConfig(kind="perception", tasks=list(reversed(fitted))), "d")  # order is free
    with pytest.raises(ValueError) as e:
        check_decoder_tasks(meta, DecoderConfig(kind="perception", tasks=asked), "d")
    assert str(e.value) == (f"decoder d was fitted for tasks {fitted}, the config's decoder.tasks asks for {asked}; "
                            "set decoder.tasks to the fitted tasks or re-train")
    assert _exit_code(e.value) == 2


def test_generate_refuses_a_decoder_task_the_fitted_decoder_lacks_before_building(tiny_cfg):
    from factory.cli import _exit_code
    from factory.recipes.generate import generate

    save_untrained_decoder(tiny_cfg)  # an interpreter fitted for segmentation
    tiny_cfg.decoder.task = "keypoints"
    with pytest.raises(ValueError, match=r"fitted for tasks \['segmentation'\], the config's decoder.task asks") as e:
        generate(tiny_cfg)
    assert _exit_code(e.value) == 2
    assert not layout.read_completions(tiny_cfg.generate.output)


def test_a_decoder_fitted_on_another_backbone_or_features_is_bad_input():
    """Exit 2 (a config to fix), still a GenerateError; the features hint names the diffusion
    resolution, which changes the tapped feature names."""
    from factory.backbones.contract import BackboneIdentity
    from factory.cli import _exit_code
    from factory.recipes.generate import GenerateError, check_decoder_fits

    meta = _fitted("perception", ["segmentation"])
    check_decoder_fits(meta, BackboneIdentity("a" * 64, 64, ["f8"], [4]), "d")
    with pytest.raises(GenerateError, match=r"was fitted on backbone aaaaaaaaaaaa, the config builds bbbbbbbbbbbb") as e:
        check_decoder_fits(meta, BackboneIdentity("b" * 64, 64, ["f8"], [4]), "d")
    assert _exit_code(e.value) == 2
    with pytest.raises(GenerateError, match=r"fitted on features \['f8'\], the config taps \['f16'\]; .*"
                                            r"backbone.diffusion.resolution") as e:
        check_decoder_fits(meta, BackboneIdentity("a" * 64, 128, ["f16"], [4]), "d")
    assert _exit_code(e.value) == 2
