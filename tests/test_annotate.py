"""The annotation round trip: export, label, import, and every kind of bad annotation."""

import json
import os
from pathlib import Path

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


def test_coco_polygons_import(tiny_cfg, capfd):
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
    assert "index" not in capfd.readouterr().out  # pycocotools' "creating index..." stays off the user's output


def _export_with_categories(cfg, categories: list[dict]) -> tuple[str, list[str]]:
    """Export the images, then a coco.json over them listing `categories` and no annotations."""
    out = annotate.export_images(cfg)
    names = [e["file"] for e in _export(out)["images"]]
    coco = {"images": [{"id": i, "file_name": n, "width": 32, "height": 32} for i, n in enumerate(names)],
            "categories": categories, "annotations": []}
    with open(os.path.join(out, "coco.json"), "w") as f:
        json.dump(coco, f)
    return out, names


def test_coco_unknown_category_is_named(tiny_cfg):
    _export_with_categories(tiny_cfg, [{"id": 3, "name": "wheel"}])
    with pytest.raises(AnnotationError, match=r"coco.json: category 'wheel' \(id 3\) is not in labels.classes"):
        annotate.import_labels(tiny_cfg)


def test_problems_with_many_classes_stay_short_and_a_misspelt_category_gets_its_closest_name(tiny_cfg):
    tiny_cfg.labels.classes = ["background", "hair"] + [f"part{i:03d}" for i in range(253)]
    out, names = _export_with_categories(tiny_cfg, [{"id": 3, "name": "hiar"}])
    with pytest.raises(AnnotationError) as err:
        annotate.import_labels(tiny_cfg)
    assert err.value.problems == [("coco.json: category 'hiar' (id 3) is not in labels.classes: ids 0..254, "
                                   "255 names; did you mean 'hair'?")]
    os.remove(os.path.join(out, "coco.json"))
    os.makedirs(os.path.join(out, "masks"), exist_ok=True)
    for name in names:
        _write(os.path.join(out, "masks", name), np.full((32, 32), 255, np.uint8))
    with pytest.raises(AnnotationError) as err:
        annotate.import_labels(tiny_cfg)
    assert len(err.value.problems) == 8
    assert all(p.endswith("class id 255 is outside labels.classes: ids 0..254, 255 names") for p in err.value.problems)
    assert len(str(err.value)) < 1200  # the class list is not repeated in each problem


def test_import_refuses_a_different_backbone(tiny_cfg, labeled_dir):
    tiny_cfg.backbone.init_seed = 1
    with pytest.raises(AnnotationError, match="export.json: exported with backbone"):
        annotate.import_labels(tiny_cfg)


def test_import_without_export_names_the_file(tiny_cfg):
    with pytest.raises(FileNotFoundError, match="export.json not found"):
        annotate.import_labels(tiny_cfg)


# ---- bad labels refused without a backbone: a hand-made export of two 8x8 images ---------------------

def _small_export(directory, task="segmentation"):
    """An exported folder of two 8x8 images, labeled by `task`'s usual file (masks or a coco.json)."""
    os.makedirs(f"{directory}/images")
    os.makedirs(f"{directory}/masks")
    entries = []
    for seed in range(2):
        pixels = np.full((8, 8, 3), 40 * seed, np.uint8)
        Image.fromarray(pixels).save(f"{directory}/images/{seed:08d}.png")
        entries.append({"file": f"{seed:08d}.png", "seed": seed, "sha256": annotations.pixels_sha256(pixels)})
        if task == "segmentation":
            _write(f"{directory}/masks/{seed:08d}.png", np.eye(8, dtype=np.uint8))
    with open(f"{directory}/{annotations.EXPORT_RECORD}", "w") as f:
        json.dump({"images": entries, "resolution": 8, "backbone_hash": "h", "psi": 1.0}, f)
    return str(directory)


_IMAGE = {"id": 1, "file_name": "00000000.png", "width": 8, "height": 8}
_POLY = [[1, 1, 6, 1, 6, 6, 1, 6]]


def _coco(annotations_=(), images=(_IMAGE,), categories=({"id": 1, "name": "thing"},), **extra):
    return {"images": list(images), "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                                     "bbox": [1, 1, 5, 5], "area": 25, **a} for a in annotations_],
            "categories": list(categories), **extra}


def _mask_as(fmt, array=None, name="00000000.png"):
    def damage(d):
        Image.fromarray(np.eye(8, dtype=np.uint8) if array is None else array).save(f"{d}/masks/{name}", format=fmt)
    return damage


def _coco_file(content):
    def damage(d):
        os.remove(f"{d}/masks/00000000.png")
        with open(f"{d}/coco.json", "wb") as f:
            f.write(content if isinstance(content, bytes) else json.dumps(content).encode())
    return damage


@pytest.mark.parametrize(
    "damage, message",
    [
        (_mask_as("JPEG"), "masks/00000000.png: its content is JPEG, not PNG"),
        (_mask_as("BMP"), "masks/00000000.png: its content is BMP, not PNG"),
        (_mask_as("GIF"), "masks/00000000.png: its content is GIF, not PNG"),
        (_mask_as("TIFF", np.full((8, 8), -1, np.int32)), "masks/00000000.png: its content is TIFF, not PNG"),
        (lambda d: Path(d, "skip.txt").write_bytes(b"# caf\xe9\n00000001.png\n"), "skip.txt:1: not UTF-8 text"),
        (_coco_file(b"[]"), "coco.json: a COCO file is a JSON object"),
        (_coco_file(b'"x"'), "coco.json: a COCO file is a JSON object"),
        (_coco_file(b'{"images": [], "categories": [{"id": 1, "name": "caf\xe9"}]}'), "coco.json:1: not UTF-8 text"),
        (_coco_file(_coco(images=[{"id": 1, "width": 8, "height": 8}])), 'coco.json: image id 1 has no "file_name"'),
        (_coco_file({"images": [_IMAGE], "annotations": []}), 'coco.json: no "categories" list'),
        (_coco_file(_coco([{"segmentation": _POLY, "category_id": 9}])),
         'coco.json: annotation 1: category_id 9 is not in "categories"'),
        (_coco_file(_coco([{"segmentation": _POLY, "image_id": 42}])),
         'coco.json: annotation 1: image_id 42 is not in "images"'),
        (_coco_file(_coco([{}])), "coco.json: annotation 1 of image '00000000.png' has no segmentation"),
        (_coco_file(_coco([{"segmentation": []}])), "coco.json: annotation 1 of image '00000000.png' has no segmentation"),
        (_coco_file(_coco([{"segmentation": [[1, 1, 6, 1]]}])), "polygon [1, 1, 6, 1] has 2 points"),
        (_coco_file(_coco([{"segmentation": [[1, 1, 6, 1, 6]]}])),
         "annotation 1 of image '00000000.png': polygon [1, 1, 6, 1, 6] has an odd number of coordinates"),
        (_coco_file(_coco([{"segmentation": _POLY[0]}])), "is not a list of polygons: nest it"),
        (_coco_file(_coco([{"segmentation": {"size": [8, 8]}}])), 'its RLE segmentation needs "counts"'),
        (_coco_file(_coco([{"segmentation": "abc"}])), 'segmentation must be polygons [[x1, y1, x2, y2, ...], ...] or RLE'),
        (_coco_file(_coco([{"segmentation": {"size": [4, 4], "counts": [16]}}])),
         "its RLE size [4, 4] differs from its image's [height, width] [8, 8]"),
        (_coco_file(_coco([{"segmentation": {"size": [8, 8], "counts": "04"}}])),  # pycocotools: 4 runs of memory
         "its RLE run lengths sum to 4, not the image's 8x8 = 64 pixels"),
        (_coco_file(_coco([{"segmentation": {"size": [8, 8], "counts": "zzzz"}}])),
         'its compressed RLE "counts" "zzzz" is not a valid COCO run-length string'),
    ],
    ids=["jpeg-mask", "bmp-mask", "gif-mask", "negative-tiff-mask", "skip-latin1", "coco-array", "coco-string",
         "coco-latin1", "coco-no-file-name", "coco-no-categories", "coco-unknown-category", "coco-unknown-image",
         "coco-bbox-only", "coco-empty-segmentation", "coco-2-point-polygon", "coco-odd-polygon", "coco-flat-polygon",
         "coco-rle-no-counts", "coco-segmentation-string", "coco-rle-size", "coco-rle-string-short",
         "coco-rle-string-invalid"],
)
def test_bad_labels_are_refused_naming_the_file(tmp_path, damage, message):
    d = _small_export(tmp_path / "export")
    damage(d)
    with pytest.raises(AnnotationError) as err:
        annotations.import_annotations(d, "segmentation", ["background", "thing"])
    assert message in str(err.value), str(err.value)
    assert len(err.value.problems) == 1, err.value.problems  # the file's problem, not also "not labeled"


_KEYPOINTS = {"keypoints": [1, 2, 2, 5, 6, 1], "num_keypoints": 2}
_NAMED = ({"id": 1, "name": "thing", "keypoints": ["a", "b"]},)


@pytest.mark.parametrize(
    "keypoints, categories, message",
    [
        ([float("nan"), 2, 2, 5, 6, 1], _NAMED, "annotation 1 of image '00000000.png': keypoints hold NaN or infinite"),
        ([1, 2, 2, 50, -6, 2], _NAMED, "annotation 1 of image '00000000.png': keypoint 'b' at (50, -6) is outside"),
        ([1, 2, 7, 5, 6, 1], _NAMED, "keypoint visibility must be 0, 1 or 2, got 7"),
        ([1, 2, 2, 5, 6], _NAMED, "annotation 1 of image '00000000.png': keypoints must be a flat list of x, y, visibility"),
        (["a", 2, 2, 5, 6, 1], _NAMED, "keypoints must be a flat list"),
        ([1, 2, 2, 5, 6, 1], ({"id": 1, "name": "thing", "keypoints": ["b", "a"]},),
         "coco.json: category 'thing' names its keypoints ['b', 'a'], but labels.keypoints is ['a', 'b']"),
    ],
    ids=["nan", "outside", "visibility", "length", "string", "names-swapped"],
)
def test_bad_coco_keypoints_are_refused_naming_the_annotation(tmp_path, keypoints, categories, message):
    d = _small_export(tmp_path / "export", task="keypoints")
    coco = _coco([{"keypoints": keypoints, "num_keypoints": 2}], categories=categories)
    with open(f"{d}/coco.json", "w") as f:
        json.dump(coco, f)
    Path(d, "skip.txt").write_text("00000001.png\n")
    with pytest.raises(AnnotationError) as err:
        annotations.import_annotations(d, "keypoints", ["a", "b"])
    assert message in str(err.value) and len(err.value.problems) == 1, err.value.problems


@pytest.mark.parametrize("task", ["segmentation", "keypoints"])
def test_unusual_but_valid_coco_imports(tmp_path, task):
    """A byte order mark, a keypoint-only annotation (drawing nothing in a mask), a category without a
    keypoint list, skip.txt with a BOM and Windows line ends; and train.labeled in a folder not made yet."""
    d = _small_export(tmp_path / "export", task="keypoints")
    coco = _coco([{"segmentation": [], **_KEYPOINTS}])
    with open(f"{d}/coco.json", "wb") as f:
        f.write(b"\xef\xbb\xbf" + json.dumps(coco).encode())
    Path(d, "skip.txt").write_bytes(b"\xef\xbb\xbf00000001.png\r\n")
    names = ["background", "thing"] if task == "segmentation" else ["a", "b"]
    labeled = annotations.import_annotations(d, task, names)
    assert labeled.files == ["00000000.png"]
    if task == "segmentation":
        assert int(labeled.masks.max()) == 0
    else:
        assert labeled.keypoints[0].tolist() == [[1, 2, 2], [5, 6, 1]]
    annotations.save_labeled_set(str(tmp_path / "not" / "yet" / "labeled.safetensors"), labeled)
    assert annotations.load_labeled_set(str(tmp_path / "not" / "yet" / "labeled.safetensors")).files == labeled.files


def test_compressed_rle_strings_decode_to_the_runs_pycocotools_encodes():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        runs = annotations.compressed_runs(mask_utils.encode(np.asfortranarray(mask))["counts"].decode())
        flat = np.concatenate([np.full(r, i % 2, np.uint8) for i, r in enumerate(runs)])
        np.testing.assert_array_equal(flat.reshape(w, h).T, mask)  # column-major runs, background first


def test_the_labeled_set_can_live_on_s3_where_every_training_node_reads_it(tiny_cfg, labeled_dir, s3_bucket):
    """On a cluster the Ray Train workers run on other nodes than the import: `train.labeled` may be
    an s3:// URL, written by the import and read by the training's checks (and workers) through a
    fetched copy."""
    from factory import storage
    from factory.recipes.train import check_inputs, inputs_hash, labeled_file

    tiny_cfg.storage = storage.current()  # the loopback endpoint
    tiny_cfg.train.labeled = f"{s3_bucket}/labels/labeled.safetensors"
    annotate.import_labels(tiny_cfg)
    assert storage.exists(tiny_cfg.train.labeled)
    labeled, _ = check_inputs(tiny_cfg)
    assert len(labeled.files) == 8 and os.path.isfile(labeled_file(tiny_cfg))
    assert inputs_hash(tiny_cfg, labeled_file(tiny_cfg))  # hashed from the fetched copy
