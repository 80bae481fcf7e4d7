"""Ensemble disagreement on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from factory.decoders.uncertainty import js_uncertainty, top_fraction_mean


def pixels(*heads: list[float]) -> torch.Tensor:
    """[E, 1, K]: one pixel's class probabilities from each head."""
    return torch.tensor(heads, dtype=torch.float64)[:, None, :]


def test_identical_heads_have_zero_disagreement():
    p = torch.rand(1, 50, 4).softmax(dim=-1).expand(5, 50, 4)
    torch.testing.assert_close(js_uncertainty(p), torch.zeros(50), atol=1e-6, rtol=0)


def test_two_confident_heads_on_different_classes_give_ln2():
    assert js_uncertainty(pixels([1.0, 0.0], [0.0, 1.0])).item() == pytest.approx(math.log(2), abs=1e-12)


def test_three_heads_by_hand():
    # mean = [0.5, 0.5]: H = ln 2; head entropies 0, 0, ln 2 -> mean ln 2 / 3; JS = 2/3 ln 2
    assert js_uncertainty(pixels([1, 0], [0, 1], [0.5, 0.5])).item() == pytest.approx(2 / 3 * math.log(2), abs=1e-12)
    # three one-hot heads on three classes: mean uniform, JS = ln 3
    assert js_uncertainty(pixels([1, 0, 0], [0, 1, 0], [0, 0, 1])).item() == pytest.approx(math.log(3), abs=1e-12)
    # [0.9, 0.1] and [0.5, 0.5]: mean [0.7, 0.3]
    h = lambda *q: -sum(x * math.log(x) for x in q)  # noqa: E731
    expected = h(0.7, 0.3) - (h(0.9, 0.1) + h(0.5, 0.5)) / 2
    assert js_uncertainty(pixels([0.9, 0.1], [0.5, 0.5])).item() == pytest.approx(expected, abs=1e-12)


def test_invariant_to_head_order_and_layout():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 2, 3, 5, 6, generator=gen).softmax(dim=2)  # [E, B, K, H, W]
    js = js_uncertainty(p)
    assert js.shape == (2, 5, 6)
    torch.testing.assert_close(js_uncertainty(p[[2, 0, 3, 1]]), js)
    moved = p.permute(1, 3, 4, 2, 0)  # [B, H, W, K, E]
    torch.testing.assert_close(js_uncertainty(moved, head_dim=-1, class_dim=-2), js)
    torch.testing.assert_close(js_uncertainty(moved, head_dim=4, class_dim=3), js)


def test_never_negative_and_zero_probabilities_are_safe():
    gen = torch.Generator().manual_seed(1)
    base = torch.rand(1, 1000, 6, generator=gen).softmax(-1)
    p = (base + 1e-9 * torch.rand(3, 1000, 6, generator=gen)).float()
    p = p / p.sum(-1, keepdim=True)
    p[0, :10] = torch.nn.functional.one_hot(torch.arange(10) % 6, 6).float()  # exact zeros
    js = js_uncertainty(p)
    assert torch.isfinite(js).all() and (js >= 0).all()


def test_same_dims_rejected():
    with pytest.raises(ValueError, match="differ"):
        js_uncertainty(torch.rand(2, 3), head_dim=0, class_dim=-2)


def test_top_fraction_mean_by_hand():
    values = torch.randperm(100, generator=torch.Generator().manual_seed(0)).float()  # 0..99 shuffled
    two = torch.stack([values, -values]).view(2, 10, 10)  # [B, H, W]
    torch.testing.assert_close(top_fraction_mean(two, 0.1), torch.tensor([94.5, -4.5]))
    torch.testing.assert_close(top_fraction_mean(two.view(2, 100), 1.0), torch.tensor([49.5, -49.5]))
    torch.testing.assert_close(top_fraction_mean(two, 1e-12), torch.tensor([99.0, 0.0]))  # at least one pixel
    torch.testing.assert_close(top_fraction_mean(torch.arange(25.0)[None], 0.1), torch.tensor([23.0]))  # ceil(2.5)
    torch.testing.assert_close(top_fraction_mean(values[:30].view(1, 30), 0.1), values[:30].topk(3).values.mean()[None])


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_top_fraction_mean_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_mean(torch.rand(2, 10), fraction)
