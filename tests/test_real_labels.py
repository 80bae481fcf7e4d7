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
