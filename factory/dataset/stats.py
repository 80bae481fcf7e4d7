"""Label statistics of a dataset's samples: what share of pixels each class covers, or how sure
the decoder is of each keypoint. One owner for the numbers `factory inspect`, the HTML report and
the dataset card show."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def label_statistics(samples: Iterable[dict], labels: list[str], task: str) -> dict:
    """{"class_pixel_frequency": {class: share of pixels}} for segmentation datasets, or
    {"keypoint_mean_score": {keypoint: mean score or None}} for keypoint ones, over `samples`
    (decoded, see `sample.decode`), with "samples_counted"; only that for other tasks."""
    counted = 0
    if task == "segmentation":
        pixels = np.zeros(len(labels), dtype=np.int64)
        for sample in samples:
            pixels += np.bincount(sample["mask"].ravel(), minlength=len(labels))[: len(labels)]
            counted += 1
        total = max(int(pixels.sum()), 1)
        return {"class_pixel_frequency": {name: round(int(c) / total, 6) for name, c in zip(labels, pixels)},
                "samples_counted": counted}
    if task != "keypoints":  # e.g. a depth-only diffusion build: no class or keypoint labels to count
        return {"samples_counted": 0}
    scores: dict[str, list[float]] = {name: [] for name in labels}
    for sample in samples:
        for kp in sample["keypoints"] or []:
            scores[kp["name"]].append(kp["score"])
        counted += 1
    return {"keypoint_mean_score": {k: float(np.mean(v)) if v else None for k, v in scores.items()},
            "samples_counted": counted}


def score_histogram(scores: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of the samples' uncertainty scores over their own range. Scores are never
    negative; when they are all one value (one sample, or a decoder whose heads cannot disagree) the
    bins start at it instead of straddling it (numpy's default range is value +- 0.5)."""
    if not scores.size:
        return np.zeros(bins, int), np.zeros(bins + 1)
    low, high = float(scores.min()), float(scores.max())
    return np.histogram(scores, bins=bins, range=(low, high if high > low else low + max(abs(low), 1.0) * 1e-3))
