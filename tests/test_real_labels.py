"""Importing a folder of real labeled images: the toy world's layout, resizing, prompts, and every bad
file named."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from factory.data import toyworld
from factory.data.annotations import AnnotationError
from factory.data.labeled_photos import (
    import_folder,
    load_real_labeled_set,
    save_real_labeled_set,
)

TASKS = ["segmentation", "depth", "instances"]


@pytest.fixture
def folder(tmp_path):
    return toyworld.write_folder(str(tmp_path / "labeled"), 6)


def test_folder_imports_with_every_label_resized(folder, tmp_path):
    s = import_folder(folder, TASKS + ["keypoints"], toyworld.CLASSES, toyworld.KEYPOINTS, 32, 1000.0)
    assert s.images.shape == (6, 32, 32, 3) and s.masks.shape == (6, 32, 32) and s.depth.shape == (6, 32, 32)
    truth = toyworld.render(0)
    assert abs(float(s.depth[0].max()) - float(truth.depth.max())) < 1e-3  # millimetres back to metres
    assert s.prompts[0] == truth.prompt and s.files[0] == "face-000000.png"
    for n in range(6):  # instance ids index instance_classes, which match the semantic mask
        for i, c in enumerate(s.instance_classes[n], 1):
            region = s.instance_map[n] == i
            if region.any():
                assert (s.masks[n][region] == c).float().mean() > 0.9
    assert s.keypoints.shape == (6, len(toyworld.KEYPOINTS), 3)  # COCO keypoints, scaled with the image
    assert np.allclose(s.keypoints[0, :, :2].numpy(), (truth.keypoints[:, :2] + 0.5) / 2 - 0.5, atol=0.02)
    save_real_labeled_set(str(tmp_path / "set.safetensors"), s)
    back = load_real_labeled_set(str(tmp_path / "set.safetensors"))
    assert back.prompts == s.prompts and back.instance_classes == s.instance_classes
    assert (back.depth == s.depth).all() and (back.images == s.images).all()


def test_non_square_images_are_resized_on_the_short_side_and_centre_cropped(tmp_path):
    d = tmp_path / "wide"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255  # the centre square is white
    mask = np.zeros((40, 80), np.uint8)
    mask[:, 20:60] = 1
    Image.fromarray(image).save(d / "images" / "a.png")
    Image.fromarray(mask).save(d / "masks" / "a.png")
    s = import_folder(str(d), ["segmentation"], ["background", "thing"], [], 16, 1000.0)
    assert s.images.shape == (1, 16, 16, 3) and int(s.images.min()) > 200 and (s.masks == 1).all()
    assert s.prompts == ["a photo of a thing"]  # made from the classes present


def test_every_bad_file_is_named_and_nothing_is_written(folder, tmp_path):
    import os

    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(os.path.join(folder, "masks", "face-000001.png"))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(os.path.join(folder, "masks", "face-000002.png"))
    os.remove(os.path.join(folder, "depth", "face-000003.png"))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.path.join(folder, "masks", "stray.png"))
    with open(os.path.join(folder, "prompts.jsonl"), "a") as f:
        f.write(json.dumps({"file": "nope.png", "prompt": "x"}) + "\n" + json.dumps({"file": "face-000004.png"}) + "\n")
    coco = json.load(open(os.path.join(folder, "instances.json")))
    coco["categories"].append({"id": 9, "name": "unicorn"})
    json.dump(coco, open(os.path.join(folder, "instances.json"), "w"))
    with pytest.raises(AnnotationError) as e:
        import_folder(folder, TASKS, toyworld.CLASSES, [], 64, 1000.0)
    text = str(e.value)
    assert "keypoints" not in text  # the faces carry keypoints; without the keypoints task they are ignored
    for expected in ["masks/face-000001.png: class id 9 is outside labels.classes",
                     "masks/face-000002.png: size 32x32, expected 64x64",
                     "images/face-000003: no depth/face-000003.png",
                     "masks/stray.png: no image named images/stray.*",
                     "prompts.jsonl:7: \"file\" must name one of the images", "prompts.jsonl:8: needs a non-empty \"prompt\"",
                     "instances.json: category 'unicorn' (id 9) is not in labels.classes"]:
        assert expected in text, (expected, text)
    assert not (tmp_path / "labeled.safetensors").exists()


def test_labels_import_needs_the_diffusion_path_and_a_folder(tmp_path):
    import os

    from factory.cli import main

    configs = os.path.join(os.path.dirname(__file__), "..", "configs")
    assert main(["labels", "import", os.path.join(configs, "demo.yaml"), f"workdir={tmp_path}"]) == 2
    assert main(["labels", "import", os.path.join(configs, "diffusion.yaml"), f"workdir={tmp_path}"]) == 2


def test_mirror_partners_swap_left_and_right_words_only():
    from factory.data.labeled_photos import mirror_partners

    names = ["left_eye", "right_eye", "nose", "mouth-left", "mouth-right", "Left Hand", "Right Hand", "leftover",
             "left_ear"]
    assert mirror_partners(names) == [1, 0, 2, 4, 3, 6, 5, 7, 8]  # no right_ear: left_ear stays itself


def test_mirrored_views_mirror_every_label_and_keep_them_consistent(folder):
    from factory.data.labeled_photos import views

    s = import_folder(folder, TASKS + ["keypoints"], toyworld.CLASSES, toyworld.KEYPOINTS, 32, 1000.0)
    v = views(s, [(2, False), (2, True), (0, True)])
    assert (v.images[0] == s.images[2]).all() and (v.images[1] == s.images[2].flip(1)).all()
    for field in ("masks", "depth", "instance_map"):
        assert (getattr(v, field)[1] == getattr(s, field)[2].flip(1)).all()
        assert (getattr(v, field)[2] == getattr(s, field)[0].flip(1)).all()
    assert v.instance_classes == [s.instance_classes[i] for i in (2, 2, 0)] and v.prompts[1] == s.prompts[2]
    assert v.files[1] == s.files[2] + " (mirrored)"
    left, right = toyworld.KEYPOINTS.index("left_eye"), toyworld.KEYPOINTS.index("right_eye")
    kp, back = v.keypoints[1], s.keypoints[2]
    assert torch.equal(kp[left, :2], torch.stack([31 - back[right, 0], back[right, 1]]))  # width 32
    assert torch.equal(kp[left, 2], back[right, 2])
    # the mirrored mask under each mirrored visible keypoint has the keypoint's class as often as before
    def hits(labeled, row):
        pts = labeled.keypoints[row]
        on = [int(labeled.masks[row][round(float(y)), round(float(x))]) == toyworld.KEYPOINT_CLASSES[k]
              for k, (x, y, vis) in enumerate(pts) if vis > 0 and 0 <= x <= 31 and 0 <= y <= 31]
        return sum(on), len(on)

    assert hits(v, 1) == hits(s, 2) and hits(v, 2) == hits(s, 0)


def _one_photo(directory, photo=None, mask=True, coco=None, prompts=None, save=None):
    """A labeled folder of one 16x16 photo a.png (or as `save(images_dir)` writes it) and its mask."""
    from pathlib import Path

    d = Path(directory)
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    if save is not None:
        save(d / "images")
    else:
        Image.fromarray(np.zeros((16, 16, 3), np.uint8) if photo is None else photo).save(d / "images" / "a.png")
    if mask:
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(d / "masks" / "a.png")
    if coco is not None:
        (d / "instances.json").write_bytes(coco if isinstance(coco, bytes) else json.dumps(coco).encode())
    if prompts is not None:
        (d / "prompts.jsonl").write_bytes(prompts)
    return str(d)


def _gradient_16bit(images):
    Image.fromarray(np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257).save(images / "a.png")


def _rotated_jpeg(images):
    upright = np.zeros((16, 32, 3), np.uint8)  # 32 wide, 16 high as shown; its left half white
    upright[:, :16] = 255
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 16 wide, 32 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show"
    stored.save(images / "a.jpg", quality=95, exif=exif)


@pytest.mark.parametrize("loader", ["labels", "pretrain"])
@pytest.mark.parametrize("save, expected", [
    (_gradient_16bit, np.repeat((np.arange(16 * 16).reshape(16, 16) * 257 >> 8).astype(np.uint8)[..., None], 3, -1)),
    (_rotated_jpeg, np.where(np.arange(16)[None, :, None] < 8, 255, 0).repeat(16, 0).repeat(3, 2)),  # left half white
], ids=["16-bit-grey", "exif-rotated"])
def test_photos_are_read_upright_and_in_8_bits(tmp_path, loader, save, expected):
    from factory.data.image_folder import load_image_folder

    d = _one_photo(tmp_path / "f", mask=False, save=save)
    if loader == "labels":
        if save is _rotated_jpeg:  # the mask is drawn on the upright photo: 32x16
            Image.fromarray(np.zeros((16, 32), np.uint8)).save(f"{d}/masks/a.png")
        else:
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(f"{d}/masks/a.png")
        got = import_folder(d, ["segmentation"], ["background", "thing"], [], 16, 1000.0).images[0].numpy()
    else:
        got = load_image_folder(d, 16).images[0]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= (2 if save is _gradient_16bit else 40)
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 8


_IMG = {"id": 1, "file_name": "a.png", "width": 16, "height": 16}
_RLE = {"size": [16, 16], "counts": [0, 256]}
_CATS = [{"id": 1, "name": "thing", "keypoints": ["p", "q"]}]


def _instances(images=(_IMG,), **ann):
    return {"images": list(images), "categories": _CATS,
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _RLE, **ann}]}


@pytest.mark.parametrize("tasks, kwargs, message", [
    (["segmentation"], {"photo": None, "mask": True, "save": lambda i: Image.fromarray(
        np.zeros((16, 16, 3), np.uint8)).save(i / "a.png")}, None),
    (["segmentation"], {"mask": False, "coco": b"[]"}, "instances.json: a COCO file is a JSON object"),
    (["segmentation"], {"mask": False, "coco": _instances([{**_IMG, "width": 32}], segmentation=[[1, 1, 5, 1, 5, 5]])},
     "instances.json: image 'a.png' has width x height 32x16, but images/a.png is 16x16"),
    (["segmentation"], {"mask": False, "coco": _instances([{"id": 1, "file_name": "a.png"}])},
     "instances.json: image 'a.png': \"width\" and \"height\" must be positive whole numbers"),
    (["segmentation"], {"mask": False, "coco": _instances(category_id=9)},
     'instances.json: annotation 1: category_id 9 is not in "categories"'),
    (["segmentation"], {"mask": False, "coco": _instances(segmentation=[])},
     "instances.json: annotation 1 of image 'a.png' has no segmentation"),
    (["segmentation"], {"mask": False, "coco": _instances(segmentation={"size": [8, 8], "counts": [64]})},
     "instances.json: annotation 1 of image 'a.png': its RLE size [8, 8] differs"),
    (["segmentation", "keypoints"], {"coco": _instances(keypoints=[1, 1, 2, float("nan"), 1, 2])},
     "instances.json: annotation 1 of image 'a.png': keypoints hold NaN"),
    (["segmentation", "keypoints"], {"coco": _instances(keypoints=[1, 1, 2, 99, 1, 2])},
     "instances.json: annotation 1 of image 'a.png': keypoint 'q' at (99, 1) is outside its 16x16 image"),
    (["segmentation", "keypoints"], {"coco": {**_instances(keypoints=[1, 1, 2, 3, 1, 2]),
                                              "categories": [{"id": 1, "name": "thing", "keypoints": ["q", "p"]}]}},
     "instances.json: category 'thing' names its keypoints ['q', 'p'], but labels.keypoints is ['p', 'q']"),
    (["segmentation"], {"save": lambda i: Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(i / "a.png"),
                        "prompts": b'{"file": "a.png", "prompt": "caf\xe9"}\n'}, "prompts.jsonl:1: not UTF-8 text"),
], ids=["masks-are-png", "coco-array", "coco-size", "coco-no-size", "coco-unknown-category", "coco-no-segmentation",
        "coco-rle-size", "keypoints-nan", "keypoints-outside", "keypoint-names-swapped", "prompts-latin1"])
def test_bad_real_labels_are_refused_naming_the_file(tmp_path, tasks, kwargs, message):
    d = _one_photo(tmp_path / "f", **kwargs)
    if message is None:  # the control, then the same mask saved as JPEG under its .png name
        import_folder(d, tasks, ["background", "thing"], ["p", "q"], 16, 1000.0)
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(f"{d}/masks/a.png", format="JPEG")
        message = "masks/a.png: its content is JPEG, not PNG"
    with pytest.raises(AnnotationError) as err:
        import_folder(d, tasks, ["background", "thing"], ["p", "q"], 16, 1000.0)
    assert message in str(err.value) and len(err.value.problems) == 1, err.value.problems


def test_prompts_jsonl_with_a_bom_and_line_separators_imports(tmp_path):
    row = json.dumps({"file": "a.png", "prompt": "a\u2028b"}, ensure_ascii=False).encode()
    d = _one_photo(tmp_path / "f", prompts=b"\xef\xbb\xbf" + row + b"\r\n")
    assert import_folder(d, ["segmentation"], ["background", "thing"], [], 16, 1000.0).prompts == ["a\u2028b"]


def test_labels_import_refuses_prompts_longer_than_the_text_encoder_takes(tmp_path):
    import os

    from factory.config import load_config
    from factory.data.labeled_photos import import_labels

    d = _one_photo(tmp_path / "f", prompts=json.dumps({"file": "a.png", "prompt": " ".join(["face"] * 100)}).encode())
    out = tmp_path / "out" / "labeled.safetensors"
    configs = os.path.join(os.path.dirname(__file__), "..", "configs")
    cfg = load_config(os.path.join(configs, "diffusion.yaml"),
                      [f"labels.dir={d}", f"train.labeled={out}", "backbone.weights=pkg://toy_diffusion",
                       "decoder.tasks=[segmentation]", "labels.classes=[background,thing]"])
    with pytest.raises(ValueError, match=r"prompts\.jsonl .*: the prompt of images/a\.png \(102 tokens: 'face face face face face face ...'\)"):
        import_labels(cfg)
    assert not out.exists()


def test_the_centre_crop_hides_the_keypoints_and_classes_it_removes(tmp_path):
    """A 48x16 photo cropped to its middle 16x16: a keypoint left of the crop gets visibility 0 (it
    kept visibility 2 at x = -14), and the prompt made from classes names only what the cropped
    labels show, from a mask file or from COCO instances alone."""
    from pathlib import Path

    classes = ["background", "hat", "thing"]
    image = {"id": 1, "file_name": "a.png", "width": 48, "height": 16}
    cats = [{"id": 1, "name": "thing", "keypoints": ["p", "q"]}, {"id": 2, "name": "hat"}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[20, 2, 28, 2, 28, 12, 20, 12]],
             "keypoints": [2, 8, 2, 24, 8, 2]},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [[1, 2, 10, 2, 10, 12, 1, 12]]}]
    mask = np.zeros((16, 48), np.uint8)
    mask[2:12, 1:10], mask[2:12, 20:28] = 1, 2
    for with_mask in (True, False):
        d = Path(tmp_path / f"mask-{with_mask}")
        (d / "images").mkdir(parents=True)
        (d / "masks").mkdir()
        Image.fromarray(np.zeros((16, 48, 3), np.uint8)).save(d / "images" / "a.png")
        if with_mask:
            Image.fromarray(mask).save(d / "masks" / "a.png")
        (d / "instances.json").write_text(json.dumps({"images": [image], "categories": cats, "annotations": anns}))
        s = import_folder(str(d), ["segmentation", "keypoints"], classes, ["p", "q"], 16, 1000.0)
        assert s.keypoints[0].tolist() == [[-14.0, 8.0, 0.0], [8.0, 8.0, 2.0]]
        assert set(s.masks[0].unique().tolist()) == {0, 2} and s.prompts == ["a photo of a thing"]


def _depth_8bit(d):
    (d / "depth").mkdir()
    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(d / "depth" / "a.png")


@pytest.mark.parametrize("mask, depth, message", [
    (Image.fromarray(np.ones((16, 16), np.uint16)), None, None),  # 16-bit ids, as `annotate import` reads them
    (Image.fromarray(np.full((16, 16), 300, np.uint16)), None, "masks/a.png: class id 300 is outside labels.classes"),
    (Image.fromarray(np.ones((16, 16), bool)), None,
     "masks/a.png: mode 1; expected a single-channel index PNG of class ids (mode L, P, I or I;16)"),
    (None, _depth_8bit, "depth/a.png: mode L; expected a 16-bit single-channel depth PNG"),
], ids=["mask-16-bit", "mask-16-bit-id-too-large", "mask-bilevel", "depth-8-bit"])
def test_mask_and_depth_modes_are_those_documented(tmp_path, mask, depth, message):
    """Masks: the modes the GAN path's `annotate import` reads (L, P, I, I;16), ids checked against
    labels.classes; depth: 16-bit only (an 8-bit map read as millimetres was silently wrong)."""
    from pathlib import Path

    d = _one_photo(tmp_path / "f")
    if mask is not None:
        mask.save(f"{d}/masks/a.png")
    if depth is not None:
        depth(Path(d))
    tasks = ["segmentation"] + (["depth"] if depth is not None else [])
    if message is None:
        assert (import_folder(d, tasks, ["background", "thing"], [], 16, 1000.0).masks == 1).all()
        return
    with pytest.raises(AnnotationError) as err:
        import_folder(d, tasks, ["background", "thing"], [], 16, 1000.0)
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(message), err.value.problems
