"""What the factory writes and reads stays inside its folder: tar members are plain files with plain
names (read back and extracted with the standard library's strictest filter), and `annotate import`
refuses symlinked label files and decompression bombs with one line naming the file."""

import os
import shutil
import tarfile

import pytest
from PIL import Image, ImageFile

from factory.data.annotations import AnnotationError, import_annotations
from factory.dataset import layout, writers

PNG = bytes.fromhex("89504e470d0a1a0a")


def _row(seed: int) -> dict:
    return {"key": f"{seed:012d}", "seed": seed, "shard": 0, "latent": [0.5], "psi": 0.7, "width": 4, "height": 4,
            "image": PNG, "mask": b"seg", "depth": b"depth", "instances": b"inst", "instance_classes": "[1]",
            "keypoints": '[{"name": "nose", "x": 1.0, "y": 2.0, "score": 0.5}]', "uncertainty": 0.25,
            "config_hash": "h"}


def test_tar_members_are_plain_files_with_plain_names(tmp_path):
    out = str(tmp_path / "ds")
    spec = layout.ShardSpec(0, 0, 5)
    [w] = writers.open_writers(out, spec, ["webdataset"])
    for seed in spec.seeds:
        w.write(_row(seed))
    w.close()
    path = os.path.join(out, layout.shard_files(spec, "webdataset")[0])
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert len(members) == 5 * 5  # image, mask, depth, instances, json per sample
        for m in members:
            assert m.isfile() and not (m.issym() or m.islnk() or m.isdir() or m.isdev()), m.name
            assert "/" not in m.name and "\\" not in m.name and ".." not in m.name and not os.path.isabs(m.name)
            assert m.mode == 0o644 and m.uid == m.gid == 0
        tar.extractall(tmp_path / "x", filter="data")  # the strictest stdlib filter accepts every member
    assert sorted(os.listdir(tmp_path / "x")) == sorted(m.name for m in members)


@pytest.mark.parametrize("key", ["../evil", "/abs", "a/b", "..", ".hidden"])
def test_keys_that_would_escape_a_tar_are_refused(tmp_path, key):
    [w] = writers.open_writers(str(tmp_path), layout.ShardSpec(0, 0, 1), ["webdataset"])
    with pytest.raises(ValueError, match="must not contain|not a plain file name"):
        w.write({**_row(0), "key": key})
    w.abort()


def _one_line(e: AnnotationError, name: str) -> bool:
    return any(name in line for line in str(e).splitlines()) and "\n" not in str(e).strip()


def test_annotate_import_refuses_a_symlinked_mask(tiny_cfg, labeled_dir, tmp_path):
    masks = os.path.join(labeled_dir, "masks")
    victim = min(os.listdir(masks))
    outside = tmp_path / "outside.png"
    shutil.move(os.path.join(masks, victim), outside)
    os.symlink(outside, os.path.join(masks, victim))
    with pytest.raises(AnnotationError, match=f"masks/{victim}: a symbolic link") as e:
        import_annotations(labeled_dir, "segmentation", tiny_cfg.label_names())
    assert _one_line(e.value, victim)


def test_annotate_import_refuses_symlinked_images_and_coco(tiny_cfg, labeled_dir, tmp_path):
    images = os.path.join(labeled_dir, "images")
    victim = sorted(os.listdir(images))[1]
    shutil.move(os.path.join(images, victim), tmp_path / victim)
    os.symlink(tmp_path / victim, os.path.join(images, victim))
    (tmp_path / "coco.json").write_text('{"images": [], "annotations": [], "categories": []}')
    os.symlink(tmp_path / "coco.json", os.path.join(labeled_dir, "coco.json"))
    with pytest.raises(AnnotationError) as e:
        import_annotations(labeled_dir, "segmentation", tiny_cfg.label_names())
    assert f"images/{victim}: a symbolic link" in str(e.value) and "coco.json: a symbolic link" in str(e.value)


def test_annotate_import_refuses_a_decompression_bomb_without_decoding_it(tiny_cfg, labeled_dir):
    masks = os.path.join(labeled_dir, "masks")
    victim = sorted(os.listdir(masks))[2]
    Image.new("L", (20000, 20000)).save(os.path.join(masks, victim), optimize=True)  # 400 MP, a few KB on disk
    with pytest.raises(AnnotationError, match=f"masks/{victim}: not a readable image") as e:
        import_annotations(labeled_dir, "segmentation", tiny_cfg.label_names())
    assert _one_line(e.value, victim)


def test_annotate_import_never_decodes_a_mask_larger_than_the_export(tiny_cfg, labeled_dir, monkeypatch):
    masks = os.path.join(labeled_dir, "masks")
    victim = sorted(os.listdir(masks))[3]
    Image.new("L", (4000, 4000)).save(os.path.join(masks, victim))  # under PIL's bomb limit
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or load(im))
    with pytest.raises(AnnotationError, match=f"masks/{victim}: size 4000x4000"):
        import_annotations(labeled_dir, "segmentation", tiny_cfg.label_names())
    assert (4000, 4000) not in decoded
