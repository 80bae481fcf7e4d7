"""The annotation round trip: export, label, import, and every kind of bad annotation."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from factory.backbones import load_backbone
from factory.data import annotations
from factory.data.annotations import AnnotationError
from factory.recipes import annotate


def _export(directory):
    with open(os.path.join(directory, annotations.EXPORT_RECORD)) as f:
        return json.load(f)


def test_export_writes_images_and_a_record(tiny_cfg):
    out = annotate.export_images(tiny_cfg)
    record = _export(out)
    assert [e["seed"] for e in record["images"]] == list(range(8))
    assert len(record["images"][0]["latent"]) == tiny_cfg.backbone.stylegan2.z_dim
    for entry in record["images"]:
        with Image.open(os.path.join(out, "images", entry["file"])) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
            assert annotations.pixels_sha256(np.array(im)) == entry["sha256"]
    assert open(os.path.join(out, "classes.txt")).read().split() == tiny_cfg.labels.classes
    assert "masks/" in open(os.path.join(out, "README.txt")).read()


def test_regenerating_from_the_stored_seed_gives_the_exported_pixels(tiny_cfg):
    out = annotate.export_images(tiny_cfg)
    entry = _export(out)["images"][5]
    again = load_backbone(tiny_cfg.backbone)([entry["seed"]])
    assert annotations.pixels_sha256(again.images[0].numpy()) == entry["sha256"]
    np.testing.assert_array_equal(again.latents[0].numpy(), np.float32(entry["latent"]))


def test_import_round_trip(tiny_cfg, labeled_dir):
    labeled = annotate.import_labels(tiny_cfg)
    again = annotations.load_labeled_set(tiny_cfg.train.labeled)
    assert again.files == labeled.files == [f"{s:08d}.png" for s in range(8)]
    assert again.masks.shape == (8, 32, 32) and again.masks.dtype.is_floating_point is False
    with Image.open(os.path.join(labeled_dir, "masks", "00000003.png")) as im:
        np.testing.assert_array_equal(again.masks[3].numpy(), np.array(im))
    assert again.seeds.tolist() == list(range(8))


def _write(path, array):
    Image.fromarray(array).save(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: _write(f"{d}/masks/00000001.png", np.zeros((16, 32), np.uint8)),
         "masks/00000001.png: size 32x16, expected 32x32"),
        (lambda d: _write(f"{d}/masks/00000002.png", np.full((32, 32), 9, np.uint8)),
         "masks/00000002.png: class id 9 is outside labels.classes"),
        (lambda d: _write(f"{d}/masks/00000003.png", np.zeros((32, 32, 3), np.uint8)),
         "masks/00000003.png: mode RGB"),
        (lambda d: os.remove(f"{d}/masks/00000004.png"),
         "images/00000004.png: not labeled"),
        (lambda d: _write(f"{d}/masks/cat.png", np.zeros((32, 32), np.uint8)),
         "masks/cat.png: no exported image"),
        (lambda d: open(f"{d}/skip.txt", "w").write("00000099.png\n"),
         "skip.txt: 00000099.png is not an exported image"),
        (lambda d: open(f"{d}/masks/00000005.png", "wb").write(b"not a png"),
         "masks/00000005.png: not a readable image"),
    ],
)
def test_bad_annotations_are_named(tiny_cfg, labeled_dir, damage, message):
    damage(labeled_dir)
    with pytest.raises(AnnotationError, match=message.replace(".", r"\.").replace("(", r"\(")):
        annotate.import_labels(tiny_cfg)
    assert not os.path.exists(tiny_cfg.train.labeled)


def test_all_problems_are_reported_at_once(tiny_cfg, labeled_dir):
    os.remove(f"{labeled_dir}/masks/00000001.png")
    _write(f"{labeled_dir}/masks/00000002.png", np.full((32, 32), 7, np.uint8))
    with pytest.raises(AnnotationError) as err:
        annotate.import_labels(tiny_cfg)
    assert len(err.value.problems) == 2


def test_skipped_images_are_left_out(tiny_cfg, labeled_dir):
    os.remove(f"{labeled_dir}/masks/00000004.png")
    with open(f"{labeled_dir}/skip.txt", "w") as f:
        f.write("# blurry\n00000004.png\n")
    labeled = annotate.import_labels(tiny_cfg)
    assert "00000004.png" not in labeled.files and len(labeled.files) == 7


def test_coco_polygons_import(tiny_cfg):
    tiny_cfg.labels.classes = ["background", "green", "blue"]
    out = annotate.export_images(tiny_cfg)
    names = [e["file"] for e in _export(out)["images"]]
    coco = {
        "images": [{"id": i, "file_name": f"images/{n}", "width": 32, "height": 32} for i, n in enumerate(names)],
        "categories": [{"id": 7, "name": "green"}, {"id": 9, "name": "blue"}],
        "annotations": [
            {"id": 1, "image_id": 0, "category_id": 7, "segmentation": [[0, 0, 16, 0, 16, 16, 0, 16]],
             "area": 256, "bbox": [0, 0, 16, 16], "iscrowd": 0},
            {"id": 2, "image_id": 0, "category_id": 9, "segmentation": [[8, 8, 24, 8, 24, 24, 8, 24]],
             "area": 256, "bbox": [8, 8, 16, 16], "iscrowd": 0},
        ],
    }
    with open(os.path.join(out, "coco.json"), "w") as f:
        json.dump(coco, f)
    labeled = annotate.import_labels(tiny_cfg)
    mask = labeled.masks[0].numpy()
    assert mask[2, 2] == tiny_cfg.labels.classes.index("green")
    assert mask[12, 12] == tiny_cfg.labels.classes.index("blue")  # later annotation paints over
    assert mask[30, 30] == 0
    assert len(labeled.files) == 8  # images without annotations are labeled all background


def test_coco_unknown_category_is_named(tiny_cfg):
    out = annotate.export_images(tiny_cfg)
    names = [e["file"] for e in _export(out)["images"]]
    coco = {
        "images": [{"id": i, "file_name": n, "width": 32, "height": 32} for i, n in enumerate(names)],
        "categories": [{"id": 3, "name": "wheel"}],
        "annotations": [],
    }
    with open(os.path.join(out, "coco.json"), "w") as f:
        json.dump(coco, f)
    with pytest.raises(AnnotationError, match=r"coco.json: category 'wheel' \(id 3\) is not in labels.classes"):
        annotate.import_labels(tiny_cfg)


def test_import_refuses_a_different_backbone(tiny_cfg, labeled_dir):
    tiny_cfg.backbone.init_seed = 1
    with pytest.raises(AnnotationError, match="export.json: exported with backbone"):
        annotate.import_labels(tiny_cfg)


def test_import_without_export_names_the_file(tiny_cfg):
    with pytest.raises(FileNotFoundError, match="export.json not found"):
        annotate.import_labels(tiny_cfg)
