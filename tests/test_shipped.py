"""The weights shipped with the package: they load through `pkg://`, match their records, generate
deterministic images, and those images are faces (the stand-in annotator finds skin and hair)."""

import json
import os

import numpy as np
import pytest

from factory.backbones import load_backbone
from factory.config import SHIPPED_DIR, ConfigError, load_config
from factory.data import toyworld
from factory.toy import segmenter
from factory.toy.annotator import SHIPPED_ANNOTATOR

SKIN = toyworld.CLASSES.index("skin")


def faces_found(images: np.ndarray) -> float:
    """Share of images in which the annotator sees a face: at least 8% of its pixels skin."""
    model, _ = segmenter.load(SHIPPED_ANNOTATOR)
    masks = segmenter.predict(model, images)
    skin = (masks == SKIN).mean(axis=(1, 2))
    return float((skin > 0.08).mean())


@pytest.fixture(scope="module")
def gan():
    cfg = load_config(None, ["backbone.weights=pkg://toy_stylegan2.safetensors"])
    return cfg, load_backbone(cfg.backbone)


def test_shipped_gan_matches_its_record_and_generates_faces_deterministically(gan):
    cfg, backbone = gan
    record = json.load(open(os.path.join(SHIPPED_DIR, "toy_stylegan2.json")))
    assert record["weights_hash"] == backbone.weights_hash  # the record describes these weights
    assert record["command"].startswith("factory pretrain configs/toy_gan.yaml") and record["seed"] == 0
    assert record["images"]["num_images"] == 4000 and backbone.resolution == 32
    seeds = list(range(100, 132))
    a, b = backbone(seeds).images, backbone(seeds).images
    assert np.array_equal(a.numpy(), b.numpy()) and not np.array_equal(a[0].numpy(), a[1].numpy())
    assert faces_found(a.numpy()) > 0.8  # the same generator with random weights: 0.16


@pytest.mark.parametrize("name, config, min_faces", [
    ("toy_diffusion", "configs/toy_dm.yaml", 0.6),  # 0.94 here, also after its UNet's decayed steps (0.78 before its VAE was retrained); the same pipeline with random weights: 0.31
    ("toy_sd3", "configs/toy_sd3.yaml", 0.6),  # 0.94 here; its transformer's seeded random init: 0.16
])
def test_shipped_diffusion_matches_its_record_and_generates_faces_deterministically(name, config, min_faces):
    cfg = load_config(None, ["backbone.kind=diffusion", "decoder.kind=perception",
                             f"backbone.weights=pkg://{name}", "backbone.diffusion.resolution=32",
                             "backbone.diffusion.guidance_scale=3.0"])
    backbone = load_backbone(cfg.backbone)
    record = json.load(open(os.path.join(SHIPPED_DIR, name, "pretrain.json")))
    assert record["weights_hash"] == backbone.weights_hash
    assert record["command"].startswith(f"factory pretrain {config}") and record["seed"] == 0
    seeds, prompts = list(range(32)), [toyworld.render(s).prompt for s in range(32)]
    a, b = backbone(seeds, prompts).images, backbone(seeds, prompts).images
    assert np.array_equal(a.numpy(), b.numpy()) and not np.array_equal(a[0].numpy(), a[1].numpy())
    assert faces_found(a.numpy()) > min_faces


@pytest.mark.parametrize("record, config", [
    ("toy_stylegan2.json", "configs/toy_gan.yaml"),
    ("toy_diffusion/pretrain.json", "configs/toy_dm.yaml"),
    ("toy_sd3/pretrain.json", "configs/toy_sd3.yaml"),
])
def test_each_shipped_record_is_what_its_config_trains(record, config):
    """"Reproducible with the same command": the config a record names trains what the record says
    was trained (every pretrain setting but where files live), and a reused VAE is the same VAE."""
    import yaml

    from factory.fingerprint import safetensors_fingerprint

    root = os.path.join(os.path.dirname(__file__), "..")
    made = json.load(open(os.path.join(SHIPPED_DIR, record)))
    assert made["command"].split()[:3] == ["factory", "pretrain", config]
    recorded = yaml.safe_load(made["config_yaml"])
    cfg = load_config(os.path.join(root, config), [])
    where = {"images", "output", "storage_path", "run_name", "vae_from"}  # where files live, not what is trained
    now = {k: v for k, v in vars(cfg.pretrain).items() if k not in where and k in recorded["pretrain"]}
    assert now == {k: recorded["pretrain"][k] for k in now}, config
    assert recorded["backbone"]["init_seed"] == cfg.backbone.init_seed
    if made.get("vae_from"):  # the VAE the config reuses has the weights the run reused (published unchanged)
        vae = os.path.join("vae", "diffusion_pytorch_model.safetensors")
        reused = safetensors_fingerprint(os.path.join(cfg.pretrain.vae_from, vae), with_metadata=False)
        assert reused == safetensors_fingerprint(os.path.join(SHIPPED_DIR, os.path.dirname(record), vae),
                                                 with_metadata=False), config


def test_shipped_weights_stay_within_their_budget():
    """Everything in factory/weights/ ships inside the wheel: 20 MB at most, all of it together."""
    sizes = {os.path.relpath(os.path.join(d, f), SHIPPED_DIR): os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(SHIPPED_DIR) for f in files}
    assert sum(sizes.values()) <= 20 * 10**6, sorted(sizes.items(), key=lambda kv: -kv[1])[:5]


def test_shipped_annotator_segments_held_out_toy_faces():
    model, classes = segmenter.load(SHIPPED_ANNOTATOR)
    assert classes == toyworld.CLASSES
    images, masks = toyworld.arrays(range(5_000_000, 5_000_064), 32)
    per_class = segmenter.iou_per_class(segmenter.predict(model, images), masks, len(classes))
    assert segmenter.mean_iou(per_class) > 0.5 and per_class[SKIN] > 0.8, per_class


def test_unknown_shipped_weights_are_named():
    with pytest.raises(ConfigError, match=r"pkg://nope.safetensors: no such shipped weights \(shipped: .*toy_stylegan2"):
        load_config(None, ["backbone.weights=pkg://nope.safetensors"])


@pytest.mark.slow
@pytest.mark.integration
def test_demo_labels_generated_faces_end_to_end(tmp_path, ray_cluster, capsys):
    """The README's first command, smaller: the stand-in annotator labels the exported faces, the
    interpreter learns them, the dataset and its preview are written."""
    from PIL import Image

    from factory.cli import main
    from factory.dataset.read import iter_samples

    work = tmp_path / "demo"
    # 200 of the demo's 1,200 steps: at 60 the class-balanced interpreter still paints the small parts over the skin
    assert main(["demo", "--workdir", str(work), "train.steps=200", "generate.num_samples=64",
                 "generate.shard_size=32", "generate.calibration_samples=32"]) == 0
    out = capsys.readouterr().out
    assert "preview" in out and (work / "dataset" / "preview.png").is_file()
    masks = [np.array(Image.open(p)) for p in sorted((work / "annotations" / "masks").glob("*.png"))]
    assert len(masks) == 16 and np.mean([(m == SKIN).mean() > 0.08 for m in masks]) > 0.8  # the annotator saw faces
    samples = list(iter_samples(str(work / "dataset")))
    assert 50 <= len(samples) <= 64 and all(s["mask"].max() < len(toyworld.CLASSES) for s in samples)
    assert np.mean([(s["mask"] == SKIN).mean() > 0.05 for s in samples]) > 0.7  # the decoder labels faces


def test_every_config_key_is_named_in_the_readme_configuration_table():
    """A user looks a key up in README's table: every field of every section is named in its row
    (`backbone.stylegan2`'s architecture fields as `stylegan2.*`, which points to the dataclass)."""
    import dataclasses
    import re

    from factory.config import FactoryConfig

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"), encoding="utf-8") as f:
        text = f.read()
    table = text[text.index("| section | what it sets |"):text.index("Outputs, training checkpoints")]
    rows = {name: line for line in table.splitlines()[2:] if line.startswith("|")
            for name in re.findall(r"`(\w+)`", line.split("|")[1])}
    config = FactoryConfig()
    missing = []
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if not dataclasses.is_dataclass(value):
            missing += [] if section.name in rows else [section.name]
            continue
        row = rows.get(section.name, "")
        for key in dataclasses.fields(value):
            nested = getattr(value, key.name)
            if dataclasses.is_dataclass(nested) and f"`{key.name}.*`" in row and key.name != "diffusion":
                continue
            names = [key.name] + ([f.name for f in dataclasses.fields(nested)] if dataclasses.is_dataclass(nested) else [])
            missing += [f"{section.name}.{n}" for n in names if f"`{n}`" not in row and f"`{n}.*`" not in row]
    assert not missing, missing
