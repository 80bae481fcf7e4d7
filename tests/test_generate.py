"""Generation stages on hand-built inputs, without Ray: sample rows, shard bytes, determinism."""

import hashlib

import numpy as np
import pyarrow as pa
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
    alone = backbone([8])
    np.testing.assert_array_equal(decode_png(rows[1]["image"]), alone.images[0].numpy())
    np.testing.assert_array_equal(np.float32(rows[1]["latent"]), alone.latents[0].numpy())
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
