"""The label-quality benchmarks' one rule, shared by `quality.py` and `active.py`: the real toy
faces every score reads (held-out, validation, shifted; fixed seed ranges no training set touches)
and the downstream run (a small U-Net, its step selected on the validation faces)."""

from __future__ import annotations

import time

EVAL_START = 1_000_000
VAL_START = 4_000_000
SHIFT_START = 6_000_000


def shift():
    """The shifted toy world of the robustness rows: faces 20% smaller, in-plane roll 1.8x wider,
    light 1.6x more one-sided (see `toyworld.WorldShift`)."""
    from factory.data import toyworld

    return toyworld.WorldShift(scale=0.8, roll=1.8, light=1.6)


def downstream(train_images, train_masks, sets: dict, num_classes: int, steps: int) -> dict:
    """One downstream run under the benchmarks' one rule: the step is selected on sets["val"]; scored
    on sets["held_out"] and sets["shifted"]."""
    from factory.toy import segmenter

    started = time.perf_counter()
    cfg = segmenter.SegmenterConfig(num_classes, width=24, levels=3)
    fit_cfg = segmenter.FitConfig(steps=steps, batch_size=32, lr=2e-3)
    model, selected = segmenter.fit_selected(train_images, train_masks, *sets["val"], cfg, fit_cfg,
                                             every=max(1, steps // 12))
    result = {"train_images": int(len(train_images)), "selected_step": selected["step"],
              "val_miou": selected["val_miou"], "val_curve": selected["curve"]}
    for name in ("held_out", "shifted"):
        images, masks = sets[name]
        per_class = segmenter.iou_per_class(segmenter.predict(model, images), masks, num_classes)
        key = "" if name == "held_out" else "shifted_"
        result[f"{key}miou"], result[f"{key}iou"] = segmenter.mean_iou(per_class), per_class
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def face_sets(eval_images: int, val_images: int, shifted: bool = True, resolution: int = 32) -> dict:
    """The real faces every score reads: `eval_images` held-out, `val_images` validation and (unless
    `shifted=False`) `eval_images` shifted."""
    from factory.data import toyworld

    sets = {"held_out": toyworld.arrays(range(EVAL_START, EVAL_START + eval_images), resolution),
            "val": toyworld.arrays(range(VAL_START, VAL_START + val_images), resolution)}
    if shifted:
        sets["shifted"] = toyworld.arrays(range(SHIFT_START, SHIFT_START + eval_images), resolution, shift=shift())
    return sets
