"""Dataset versions without Ray: LATEST resolution, retention, and validation catching damage."""

import json
import os

import pytest
from conftest import save_untrained_decoder

from factory.dataset import layout, validate, versions
from factory.recipes.labeling import build_shard


@pytest.fixture
def version(tiny_cfg, tmp_path):
    """A small finished version <root>/2026-11-20 written the way generate() writes one."""
    from factory.decoders.files import load_decoder

    backbone = save_untrained_decoder(tiny_cfg)
    decoder = load_decoder(tiny_cfg.generate.decoder)
    root = str(tmp_path / "root")
    tiny_cfg.generate.output = f"{root}/2026-11-20"
    layout.prepare_output(tiny_cfg.generate.output, "b", {}, overwrite=False)
    plan = layout.plan_shards(0, 24, 12)
    records = [build_shard(backbone, decoder, tiny_cfg, spec, "c") for spec in plan]
    manifest = {"format": layout.FORMAT, "build_hash": "b", "config_hash": "c", "task": "segmentation",
                "labels": ["background", "blue"], "formats": ["parquet"], "num_samples": 24, "num_shards": 2,
                "complete": True, "shards": records, "failed": []}
    layout.write_manifest(tiny_cfg.generate.output, manifest)
    return root, manifest


def test_latest_moves_only_when_set_and_resolves(version):
    root, manifest = version
    with pytest.raises(FileNotFoundError, match="no LATEST pointer"):
        versions.resolve(f"{root}@latest")
    versions.set_latest(root, "2026-11-20", manifest)
    assert versions.resolve(f"{root}@latest") == f"{root}/2026-11-20"
    assert versions.resolve(f"{root}/2026-11-20") == f"{root}/2026-11-20"
    assert json.loads(open(f"{root}/LATEST").read())["version"] == "2026-11-20"
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        versions.set_latest(root, "tonight", manifest)
    # a backfilled older night is published beside the newer one, which stays LATEST
    assert versions.set_latest(root, "2026-11-18", manifest)["version"] == "2026-11-20"
    assert versions.resolve(f"{root}@latest") == f"{root}/2026-11-20"
    assert versions.set_latest(root, "2026-11-21", manifest)["version"] == "2026-11-21"


def test_retention_keeps_the_newest_and_never_latest(version):
    root, manifest = version
    for name in ("2026-11-18", "2026-11-19", "2026-11-21", "2026-11-22"):
        os.makedirs(f"{root}/{name}")
    versions.set_latest(root, "2026-11-20", manifest)
    assert versions.prune(root, keep=2) == ["2026-11-18", "2026-11-19"]
    assert versions.list_versions(root) == ["2026-11-20", "2026-11-21", "2026-11-22"]


def test_a_good_version_validates(version):
    root, _ = version
    checked = validate.validate(f"{root}/2026-11-20")
    assert checked == {"samples": 24, "files_checked": 2, "samples_checked": 24}


def test_validation_lists_damage(version):
    root, _ = version
    ds = f"{root}/2026-11-20"
    path = f"{ds}/parquet/shard-00001.parquet"
    with open(path, "rb") as f:
        original = f.read()
    with open(path, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(validate.ValidationError, match=r"shard-00001.parquet has \d+ bytes, its record says \d+"):
        validate.validate(ds, verify_checksums=False)  # sizes are checked even without checksums
    with open(path, "wb") as f:  # the same size, its footer magic broken: only the sha256 or a read sees it
        f.write(original[:-4] + b"XXXX")
    with pytest.raises(validate.ValidationError, match="shard-00001.parquet does not match its recorded sha256"):
        validate.validate(ds)
    with pytest.raises(validate.ValidationError, match="cannot read its samples: ArrowInvalid"):
        validate.validate(ds, verify_checksums=False)
    with pytest.raises(validate.ValidationError, match="24 samples kept, fewer than the required 100"):
        validate.validate(ds, min_samples=100)
    os.remove(f"{ds}/parquet/shard-00000.parquet")
    with pytest.raises(validate.ValidationError, match="shard-00000.parquet is missing"):
        validate.validate(ds)


def test_latest_without_a_root_is_refused_naming_what_to_give():
    from factory.dataset import versions

    with pytest.raises(ValueError, match=r"'@latest' names no root: give ROOT@latest"):
        versions.resolve("@latest")
