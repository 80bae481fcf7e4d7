"""The toy world: determinism, variety, and ground truth that matches the rendered pixels."""

import numpy as np
import pytest

from factory.backbones.tiny_diffusion import WORDS
from factory.data import toyworld


@pytest.fixture(scope="module")
def scenes():
    return toyworld.render_batch(range(200))


def test_a_scene_is_a_function_of_its_seed_whatever_the_batch():
    alone = toyworld.render(7)
    in_batch = toyworld.render_batch([3, 7, 11])[1]
    for field in ("image", "mask", "instances", "depth", "keypoints"):
        assert np.array_equal(getattr(alone, field), getattr(in_batch, field)), field
    assert alone.prompt == in_batch.prompt
    assert not np.array_equal(toyworld.render(8).image, alone.image)
    assert toyworld.render(7, size=32).image.shape == (32, 32, 3)


def test_labels_agree_with_each_other(scenes):
    for s in scenes:
        assert s.image.dtype == np.uint8 and s.mask.dtype == np.uint8 and s.depth.dtype == np.float32
        assert s.classes == toyworld.PART_CLASSES
        for i, class_id in enumerate(s.classes, 1):  # every instance pixel carries its part's class
            assert (s.mask[s.instances == i] == class_id).all()
        assert ((s.mask > 0) == (s.instances > 0)).all() and (s.depth > 0).all()


def test_mask_edges_are_image_edges(scenes):
    """A mask that matches the rendered pixels changes where the colour changes: neighbouring pixels
    of different parts differ in colour far more than neighbours within one part, and a mask shifted
    by two pixels loses that."""

    def contrast(image, mask):
        img = image.astype(np.float32)
        dcol = np.abs(img[:, 1:] - img[:, :-1]).sum(-1)
        edge = mask[:, 1:] != mask[:, :-1]
        return dcol[edge].mean() / max(dcol[~edge].mean(), 1e-3)

    ratios = [contrast(s.image, s.mask) for s in scenes[:50]]
    shifted = [contrast(s.image, np.roll(s.mask, 2, axis=1)) for s in scenes[:50]]
    assert np.median(ratios) > 4 and np.median(ratios) > 2 * np.median(shifted), (np.median(ratios), np.median(shifted))


def test_keypoints_lie_in_their_parts_in_face_order(scenes):
    visible = hidden = 0
    for s in scenes:
        kp = s.keypoints
        assert kp.shape == (len(toyworld.KEYPOINTS), 3)
        for k, (x, y, v) in enumerate(kp):
            if v == 0:
                continue
            row, col = int(np.floor(y + 0.5)), int(np.floor(x + 0.5))  # pixel centres are integers
            part = s.mask[row, col]
            if v == 2:
                visible += 1
                assert part == toyworld.KEYPOINT_CLASSES[k]
                if k < 2:  # each eye keypoint in its own eye, left in the left one
                    assert s.instances[row, col] == toyworld.PARTS.index(toyworld.KEYPOINTS[k]) + 1
            else:
                hidden += 1
                assert part != toyworld.KEYPOINT_CLASSES[k]
        eyes = kp[:2, :2].mean(0)
        dist = [np.linalg.norm(kp[i, :2] - eyes) for i in (2, 3, 5)]  # nose, mouth, chin: farther and farther
        assert dist[0] < dist[1] < dist[2]
        assert kp[0, 0] < kp[1, 0] and kp[3, 0] < kp[4, 0]  # left and right as seen in the image
    assert visible > 0.85 * (visible + hidden) and hidden > 0  # occluders hide a few


def test_depth_puts_the_face_in_front_and_the_nose_forward(scenes):
    for s in scenes:
        face = s.mask == toyworld.CLASSES.index("skin")
        wall = s.depth.max()
        assert s.depth[face].mean() < 3 and wall > 8
        x, y, v = s.keypoints[2]
        cx, cy = np.floor(s.keypoints[5, :2] + 0.5).astype(int)
        if v == 2 and s.keypoints[5, 2] == 2:
            assert s.depth[int(np.floor(y + 0.5)), int(np.floor(x + 0.5))] < s.depth[cy, cx]  # nose nearer than chin


def test_the_world_varies_and_covers_every_class(scenes):
    masks = np.stack([s.mask for s in scenes])
    present = np.stack([np.bincount(m.ravel(), minlength=len(toyworld.CLASSES)) > 0 for m in masks])
    assert present.mean(0).min() > 0.3, present.mean(0)  # every part shows in a good share of scenes
    assert len({s.prompt for s in scenes}) > 50
    skin_colour = [s.image[s.mask == 1].mean(0) for s in scenes[:50]]
    assert np.std(skin_colour, axis=0).mean() > 20  # skin tones differ
    areas = [(s.mask > 0).mean() for s in scenes]
    assert min(areas) < 0.35 < max(areas)  # scale varies
    words = set(WORDS)
    assert all(set(s.prompt.split()) <= words for s in scenes)  # the tiny tokenizer knows every word


def test_folder_round_trips_with_keypoints(tmp_path):
    import json

    folder = toyworld.write_folder(str(tmp_path / "faces"), 5, start_seed=40, batch=2)
    coco = json.load(open(f"{folder}/instances.json"))
    assert [c["name"] for c in coco["categories"]] == toyworld.CLASSES[1:]
    assert [i["file_name"] for i in coco["images"]] == [f"face-{s:06d}.png" for s in range(40, 45)]
    with_kp = [a for a in coco["annotations"] if "keypoints" in a]
    assert len(with_kp) == 5 and all(a["category_id"] == toyworld.CLASSES.index("skin") for a in with_kp)
    np.testing.assert_allclose(np.reshape(with_kp[1]["keypoints"], (-1, 3)), toyworld.render(41).keypoints, atol=0.01)


def test_a_shifted_world_moves_only_its_parameters():
    same = toyworld.render_batch(range(6), 32, shift=toyworld.WorldShift())
    for a, b in zip(toyworld.render_batch(range(6), 32), same):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    small = toyworld.arrays(range(100), 32, shift=toyworld.WorldShift(scale=0.8))[1]
    plain = toyworld.arrays(range(100), 32)[1]
    assert (small > 0).mean() < 0.8 * (plain > 0).mean()  # smaller faces: fewer face pixels
    shifted = toyworld.render(5, shift=toyworld.WorldShift(scale=0.8, roll=1.8, light=1.6))
    assert shifted.prompt == toyworld.render(5).prompt  # the same scene otherwise


def test_large_faces_are_written_in_smaller_batches(tmp_path, monkeypatch):
    """A batch's arrays stay near 256 scenes at 64 px (about 110 MiB), so `factory toyworld --size 1024`
    draws one scene at a time instead of running out of memory."""
    sizes = []
    real = toyworld.render_batch
    monkeypatch.setattr(toyworld, "render_batch", lambda seeds, size: sizes.append(len(seeds)) or real(seeds, size))
    toyworld.write_folder(str(tmp_path / "big"), 5, size=512)
    assert sizes == [4, 1]
    sizes.clear()
    toyworld.write_folder(str(tmp_path / "small"), 5, size=64)
    assert sizes == [5]
