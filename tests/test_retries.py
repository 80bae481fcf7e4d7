"""Ray-level retries: an actor that crashes mid-shard is restarted and its shard resubmitted; once
`generate.max_retries` is spent, the shard is reported failed in the manifest and the exit code."""

import os
import sys

import pytest
import ray.cloudpickle
from conftest import save_untrained_decoder

from factory.dataset import layout
from factory.recipes.generate import GenerateError, ShardBuilder, generate

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/


class CrashingBuilder(ShardBuilder):
    """Kills its own actor process on shard 1: once (a marker file remembers), or every time."""

    def __init__(self, *args, marker: str, always: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.marker, self.always = marker, always

    def build(self, spec):
        if spec.index == 1 and (self.always or not os.path.exists(self.marker)):
            open(self.marker, "a").close()
            os._exit(1)  # as an OOM kill or a segfault would
        return super().build(spec)


def crashing(marker: str, always: bool) -> type:
    class Builder(CrashingBuilder):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, marker=marker, always=always, **kwargs)

    return Builder


@pytest.fixture
def cfg(tiny_cfg, ray_cluster):
    tiny_cfg.generate.drop_uncertain = 0.0
    tiny_cfg.generate.num_actors = 1
    tiny_cfg.generate.cpus_per_actor = 0.5
    save_untrained_decoder(tiny_cfg)
    return tiny_cfg


def test_a_crashed_actor_is_restarted_and_its_shard_rebuilt(cfg, tmp_path):
    cfg.generate.max_retries = 1
    manifest = generate(cfg, builder=crashing(str(tmp_path / "crashed"), always=False))
    assert (tmp_path / "crashed").exists()  # the actor did die once
    assert manifest["complete"] and [s["count"] for s in manifest["shards"]] == [16, 16, 8]


def test_a_shard_that_keeps_crashing_is_reported_failed(cfg, tmp_path):
    cfg.generate.max_retries = 0
    with pytest.raises(GenerateError, match="shard-00001"):
        generate(cfg, builder=crashing(str(tmp_path / "crashed"), always=True))
    manifest = layout.read_manifest(cfg.generate.output)
    assert not manifest["complete"]
    assert "shard-00001" in [f["name"] for f in manifest["failed"]]
    assert "shard-00001" not in [s["name"] for s in manifest["shards"]]
    assert not os.path.exists(os.path.join(cfg.generate.output, "README.md"))  # no card: not a finished dataset
    assert layout.read_completion(cfg.generate.output, layout.ShardSpec(1, 0, 0)) is None


class CountingBuilder(ShardBuilder):
    """Appends a line per shard it runs the models for (staged or built) to a log file."""

    log_path = ""

    def build(self, spec):
        record = super().build(spec)
        with open(self.log_path, "a") as f:
            f.write(f"{spec.name} {'staged' if record.get('staged') else 'built'}\n")
        return record


def test_the_calibration_pass_computes_no_sample_twice(tiny_cfg, ray_cluster, tmp_path):
    """The first shards are staged unfiltered on the build's own actors, their scores fix the
    threshold, and they are finished from their rows: every shard runs the models exactly once."""
    g = tiny_cfg.generate
    g.num_samples, g.shard_size, g.calibration_samples, g.num_actors, g.cpus_per_actor = 96, 16, 24, 2, 0.5
    save_untrained_decoder(tiny_cfg)
    log_path = str(tmp_path / "calls.log")

    class Builder(CountingBuilder):
        pass

    Builder.log_path = log_path
    manifest = generate(tiny_cfg, builder=Builder)
    calls = open(log_path).read().split("\n")[:-1]
    assert sorted(line.split()[0] for line in calls) == [f"shard-{i:05d}" for i in range(6)]  # each once
    finished = [s["name"] for s in manifest["shards"] if "finish_staged_s" in s["timings"]]
    assert {"shard-00000", "shard-00001"} <= set(finished)  # made before the threshold, finished after
    calibration = manifest["calibration"]
    assert calibration["staged_shards"] == ["shard-00000", "shard-00001"] and calibration["num_scored"] == 24
    assert manifest["complete"] and manifest["num_generated"] == 96
    assert all(max(0.0, s["uncertainty"]["min"]) <= s["uncertainty"]["max"] for s in manifest["shards"])
    import pyarrow.parquet as pq

    kept = pq.read_table(f"{g.output}/parquet").column("uncertainty").to_pylist()
    assert len(kept) == manifest["num_samples"] < 96 and max(kept) <= calibration["threshold"]
    assert not os.path.exists(f"{g.output}/_staging")  # every staged shard was finished


def test_a_disk_full_while_publishing_is_a_failed_run_naming_the_file(cfg, monkeypatch):
    """The disk fills up as the manifest is written: a failed run (GenerateError: exit 1, not a bad
    input) naming the file, no manifest published; the re-run publishes the same build."""
    import errno

    real = layout.write_manifest

    def full(output, manifest):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(output, layout.MANIFEST))

    monkeypatch.setattr(layout, "write_manifest", full)
    with pytest.raises(GenerateError, match=r"manifest\.json: No space left on device; its shards are kept"):
        generate(cfg)
    assert not os.path.exists(os.path.join(cfg.generate.output, layout.MANIFEST))
    monkeypatch.setattr(layout, "write_manifest", real)
    manifest = generate(cfg)
    assert manifest["complete"] and manifest["num_generated"] == cfg.generate.num_samples
