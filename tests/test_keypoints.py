"""Gaussian heatmaps from keypoints and back."""

from __future__ import annotations

import pytest
import torch

from factory.decoders.keypoints import decode_heatmaps, gaussian_heatmaps


def test_integer_keypoints_round_trip_exactly():
    kp = torch.tensor(
        [[[5, 7, 2], [0, 0, 2], [19, 15, 1], [12, 3, 0]],
         [[1, 14, 2], [18, 0, 2], [10, 10, 2], [3, 9, 2]]],
        dtype=torch.float32,
    )
    heat = gaussian_heatmaps(kp, (16, 20), sigma=2.0)
    assert heat.shape == (2, 4, 16, 20)
    assert heat.min() >= 0 and heat.max() <= 1
    decoded = decode_heatmaps(heat)
    visible = kp[..., 2] > 0
    assert torch.equal(decoded[..., :2][visible], kp[..., :2][visible])
    assert torch.equal(decoded[..., 2][visible], torch.ones(int(visible.sum())))
    assert heat[0, 3].abs().sum() == 0 and decoded[0, 3, 2] == 0  # invisible: empty map, score 0


def test_peak_is_one_on_the_keypoint_pixel():
    heat = gaussian_heatmaps(torch.tensor([[[4.0, 2.0, 2.0]]]), (6, 8), sigma=1.5)[0, 0]
    assert heat[2, 4] == 1.0 and heat.flatten().argmax() == 2 * 8 + 4
    assert heat[2, 5] == pytest.approx(float(torch.exp(torch.tensor(-1 / (2 * 1.5**2)))))


def test_sub_pixel_keypoints_round_trip():
    kp = torch.tensor([[[10.3, 7.8, 2], [4.5, 4.49, 2], [2.2, 12.7, 2]]])
    decoded = decode_heatmaps(gaussian_heatmaps(kp, (16, 16), sigma=2.0))
    torch.testing.assert_close(decoded[..., :2], kp[..., :2], atol=1e-3, rtol=0)


def test_decode_single_hot_pixel_and_noisy_map():
    heat = torch.zeros(1, 2, 5, 6)
    heat[0, 0, 3, 1] = 0.7
    heat[0, 1] = -0.2
    heat[0, 1, 2, 4], heat[0, 1, 2, 5] = 0.9, 0.3  # an asymmetric, partly negative peak
    decoded = decode_heatmaps(heat)
    assert decoded[0, 0].tolist() == pytest.approx([1.0, 3.0, 0.7])
    assert 4.0 <= decoded[0, 1, 0] <= 4.5 and decoded[0, 1, 1] == 2.0


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="sigma"):
        gaussian_heatmaps(torch.zeros(1, 1, 3), (4, 4), sigma=0.0)
    with pytest.raises(ValueError, match=r"\[N, K, 3\]"):
        gaussian_heatmaps(torch.zeros(1, 3), (4, 4), sigma=1.0)
