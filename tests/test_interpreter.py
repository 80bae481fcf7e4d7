"""The Style Interpreter: batched heads, project-then-upsample, pixel gathering, predictions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from factory.decoders.interpreter import (
    SegmentationPrediction,
    StyleInterpreter,
    feature_stats,
    gather_pixel_features,
    predict_keypoints,
    predict_segmentation,
    prior_offset,
)
from factory.decoders.keypoints import decode_heatmaps, gaussian_heatmaps
from factory.decoders.uncertainty import js_uncertainty, top_fraction_mean

SIZE = (24, 20)
# (channels, native size): integer and non-integer scale factors, a non-square map, two maps of
# one size, one already at full size and one larger than the output.
TAPS = [(6, (3, 3)), (5, (3, 3)), (4, (7, 5)), (3, (12, 10)), (2, (24, 20)), (3, (30, 25))]
# Maps wider than NARROW_WIDTH take the other upsampling path.
WIDE_SIZE = (40, 72)
WIDE_TAPS = [(3, (3, 3)), (4, (10, 36)), (2, (20, 48)), (3, (40, 72)), (2, (33, 90))]


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: extra threads only add barriers, which stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_features(batch: int = 2, seed: int = 0, taps=TAPS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, *hw, generator=gen) for c, hw in taps]


def make_model(num_outputs: int = 4, heads: int = 3, seed: int = 0, taps=TAPS) -> StyleInterpreter:
    """A model with O(1) outputs and non-trivial BN running statistics, in eval mode."""
    model = StyleInterpreter([c for c, _ in taps], num_outputs, num_heads=heads, hidden=(8, 6), seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
        for norm in model.norms:
            norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=gen))
            norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=gen) * 2 + 0.3)
    return model.eval()


def upsample_concat(features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features], 1)


@pytest.mark.parametrize("band_elements", [50, 5_000, 1 << 23])
@pytest.mark.parametrize(
    ("taps", "size"),
    [(TAPS, SIZE), (WIDE_TAPS, WIDE_SIZE), ([(3, SIZE), (2, SIZE)], SIZE)],
    ids=["narrow", "wide", "full-size-only"],
)
def test_project_then_upsample_equals_naive(taps, size, band_elements):
    model, features = make_model(taps=taps), make_features(taps=taps)
    with torch.no_grad():
        naive = model.forward_maps_naive(features, size)
        fast = model.forward_maps(features, size, band_elements=band_elements)
    assert fast.shape == naive.shape == (3, 2, 4, *size)
    assert naive.abs().max() > 1.0  # a real signal, not a vanishing one
    assert (fast - naive).abs().max() < 1e-4


def test_standardized_inputs_fold_into_the_first_layer():
    """With feature statistics set, the project-then-upsample path (statistics folded into the first
    layer) equals the per-pixel MLP on standardised pixel vectors, and differs from the raw model."""
    model, features = make_model(), make_features()
    raw = model.forward_maps(features, SIZE)
    gen = torch.Generator().manual_seed(7)
    mean, std = torch.randn(model.in_features, generator=gen), torch.rand(model.in_features, generator=gen) + 0.2
    model.standardize(mean, std)
    with torch.no_grad():
        naive, fast = model.forward_maps_naive(features, SIZE), model.forward_maps(features, SIZE)
        pixels = upsample_concat(features, SIZE)[1, :, 5, 7]
        by_hand = StyleInterpreter.forward(make_model(), ((pixels - mean) / std)[None])
    assert (fast - naive).abs().max() < 1e-4 and (fast - raw).abs().max() > 0.1
    torch.testing.assert_close(naive[:, 1, :, 5, 7], by_hand[:, 0])


def test_feature_stats_are_per_channel_over_the_chosen_images():
    features = [torch.randn(4, 3, 5, 5) * torch.tensor([1.0, 10.0, 0.1])[None, :, None, None] + 2, torch.ones(4, 2, 2, 2)]
    mean, std = feature_stats(features, [0, 2])
    picked = features[0][[0, 2]].transpose(0, 1).flatten(1)
    torch.testing.assert_close(mean[:3], picked.mean(1))
    torch.testing.assert_close(std[:3], picked.std(1, unbiased=False))
    assert mean[3:].tolist() == [1.0, 1.0] and std[3:].tolist() == [1.0, 1.0]  # constant: shifted, not scaled
    model = StyleInterpreter([3, 2], 2, num_heads=2)
    with pytest.raises(ValueError, match=r"std > 0"):
        model.standardize(mean, torch.zeros(5))
    with pytest.raises(ValueError, match=r"\[5\]"):
        model.standardize(mean[:4], std[:4])


def test_the_logit_offset_shifts_inference_logits_only():
    """`offset_logits`: the project-then-upsample path (offset folded into the output layer's bias)
    and the naive one both add the offset to every head's logits at every pixel; `forward`, which
    training calls on sampled pixels, stays raw."""
    model, features = make_model(), make_features()
    pixels = torch.randn(5, model.in_features)
    before_maps, before_pixels = model.forward_maps(features, SIZE), model(pixels)
    offset = torch.tensor([0.5, -1.0, 2.0, -0.25])
    model.offset_logits(offset)
    with torch.no_grad():
        fast, naive = model.forward_maps(features, SIZE), model.forward_maps_naive(features, SIZE)
        torch.testing.assert_close(model(pixels), before_pixels)
    torch.testing.assert_close(fast, before_maps + offset[None, None, :, None, None], atol=1e-5, rtol=1e-5)
    assert (fast - naive).abs().max() < 1e-4
    assert predict_segmentation(model, features, SIZE).labels.eq(2).float().mean() > \
        logits_labels(before_maps).eq(2).float().mean()  # the favoured class gains pixels
    with pytest.raises(ValueError, match=r"\[4\]"):
        model.offset_logits(torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        model.offset_logits(torch.tensor([0.0, float("-inf"), 0.0, 0.0]))


def logits_labels(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(2).mean(0).argmax(1)


def test_prior_offset_is_a_power_of_the_smoothed_class_frequencies():
    counts = torch.tensor([90, 7, 0, 3])
    prior = (counts.double() + 1) / (100 + 4)
    torch.testing.assert_close(prior_offset(counts, 0.5), (0.5 * prior.log()).float())
    assert prior_offset(counts, 0.0).eq(0).all()
    assert torch.isfinite(prior_offset(counts, 1.0)).all()  # an absent class: finite, the lowest
    with pytest.raises(ValueError, match="counts >= 0"):
        prior_offset(torch.tensor([1, -1]), 0.5)


def test_naive_reference_is_the_per_pixel_mlp():
    model, features = make_model(), make_features()
    with torch.no_grad():
        naive = model.forward_maps_naive(features, SIZE)
        pixels = upsample_concat(features, SIZE)[1, :, 5, 7]
        torch.testing.assert_close(naive[:, 1, :, 5, 7], model(pixels[None])[:, 0])


def test_gather_pixel_features_equals_upsample_and_index():
    features = make_features(batch=3)
    full = upsample_concat(features, SIZE)
    b, y, x = torch.meshgrid(torch.arange(3), torch.arange(SIZE[0]), torch.arange(SIZE[1]), indexing="ij")
    b, y, x = b.flatten(), y.flatten(), x.flatten()  # every pixel, borders included
    order = torch.randperm(b.numel(), generator=torch.Generator().manual_seed(0))
    b, y, x = b[order], y[order], x[order]
    gathered = gather_pixel_features(features, b, y, x, SIZE)
    assert gathered.shape == (b.numel(), sum(c for c, _ in TAPS))
    assert (gathered - full[b, :, y, x]).abs().max() < 1e-5


def test_forward_shared_and_per_head_pixels():
    model = make_model()
    x = torch.randn(7, model.in_features)
    shared = model(x)
    assert shared.shape == (3, 7, 4)
    torch.testing.assert_close(model(x.expand(3, 7, -1)), shared)
    per_head = torch.randn(3, 7, model.in_features)
    out = model(per_head)
    for e in range(3):
        torch.testing.assert_close(out[e], model(per_head[e])[e])
    with pytest.raises(ValueError, match="expected"):
        model(torch.randn(2, 7, model.in_features))


def test_heads_differ_and_init_is_deterministic():
    a, b, c = (StyleInterpreter([5, 3], 4, num_heads=3, seed=s) for s in (0, 0, 1))
    for (name, ta), tb, tc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(ta, tb), name
    w = a.linears[0].weight
    assert not torch.equal(w, c.linears[0].weight)
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    out = a.eval()(torch.randn(10, 8))
    assert not torch.allclose(out[0], out[1])


def test_parameters_are_batched_across_heads():
    small, large = StyleInterpreter([5, 3], 4, num_heads=1), StyleInterpreter([5, 3], 4, num_heads=7)
    assert large.linears[0].weight.shape == (7, 8, 128)
    assert large.norms[0].running_mean.shape == (7, 128)
    assert len(list(small.parameters())) == len(list(large.parameters()))  # heads are a dim, not modules
    assert not any(isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.Sequential)) for m in large.modules())


def test_hidden_widths_follow_the_paper():
    assert StyleInterpreter([4], 31).hidden == (128, 32)
    wide = StyleInterpreter([4], 32)
    assert wide.hidden == (256, 128) and wide.linears[1].weight.shape == (10, 256, 128)
    assert StyleInterpreter([4], 40, hidden=[16, 8]).hidden == (16, 8)


def reference_head(model: StyleInterpreter, e: int) -> nn.Sequential:
    """Head e as torch's own Linear/ReLU/BatchNorm1d stack, copied from the batched tensors."""
    layers: list[nn.Module] = []
    for i, linear in enumerate(model.linears):
        ref = nn.Linear(*linear.weight.shape[1:])
        ref.weight.data.copy_(linear.weight[e].T)
        ref.bias.data.copy_(linear.bias[e])
        layers.append(ref)
        if i < len(model.norms):
            norm = model.norms[i]
            bn = nn.BatchNorm1d(norm.weight.shape[1])
            bn.weight.data.copy_(norm.weight[e])
            bn.bias.data.copy_(norm.bias[e])
            bn.running_mean.copy_(norm.running_mean[e])
            bn.running_var.copy_(norm.running_var[e])
            layers += [nn.ReLU(), bn]
    return nn.Sequential(*layers)


def test_each_head_behaves_like_torch_batchnorm_mlp():
    model = make_model(heads=3)
    refs = [reference_head(model, e) for e in range(3)]
    x = torch.randn(3, 32, model.in_features)
    model.train()
    out = model(x)
    for e, ref in enumerate(refs):
        torch.testing.assert_close(out[e], ref.train()(x[e]), atol=1e-5, rtol=1e-5)
        for norm, bn in zip(model.norms, [m for m in ref if isinstance(m, nn.BatchNorm1d)]):
            torch.testing.assert_close(norm.running_mean[e], bn.running_mean)
            torch.testing.assert_close(norm.running_var[e], bn.running_var)
    model.eval()
    out = model(x)
    for e, ref in enumerate(refs):
        torch.testing.assert_close(out[e], ref.eval()(x[e]), atol=1e-5, rtol=1e-5)


def test_forward_maps_needs_eval_mode():
    model, features = make_model().train(), make_features()
    with pytest.raises(RuntimeError, match="eval"):
        model.forward_maps(features, SIZE)
    with pytest.raises(RuntimeError, match="eval"):
        predict_segmentation(model, features, SIZE)
    with pytest.raises(ValueError, match="channels"):
        model.eval().forward_maps(features[:-1], SIZE)
    assert not model.forward_maps(features, SIZE).requires_grad  # inference only, even with grad enabled


def test_state_dict_round_trips_through_safetensors(tmp_path):
    model = make_model()
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    fresh = StyleInterpreter([c for c, _ in TAPS], 4, num_heads=3, hidden=(8, 6), seed=5)
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    features = make_features()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().forward_maps(features, SIZE), model.forward_maps(features, SIZE))


def test_the_ensemble_learns_a_pixel_rule():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 16, generator=gen)
    y = x[:, :3].argmax(dim=1)  # the class is a fixed function of three feature dims
    model = StyleInterpreter([10, 6], 3, num_heads=3, hidden=(32, 16), seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(300):
        idx = torch.randint(2500, (3, 128), generator=gen)
        loss = F.cross_entropy(model(x[idx]).flatten(0, 1), y[idx].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pred = model.eval()(x[2500:]).softmax(-1).mean(0).argmax(-1)
    assert (pred == y[2500:]).float().mean() > 0.95


def constant_head_model(head_logits: list[list[float]]) -> StyleInterpreter:
    """Heads whose last layer ignores its input and outputs the given logits everywhere."""
    model = StyleInterpreter([3], len(head_logits[0]), num_heads=len(head_logits), hidden=(4, 4)).eval()
    with torch.no_grad():
        model.linears[-1].weight.zero_()
        model.linears[-1].bias.copy_(torch.tensor(head_logits))
    return model


def test_segmentation_votes_with_mean_probabilities():
    # mean logits [1.33, 6.67] pick class 1; mean probabilities [0.59, 0.41] pick class 0
    logits = [[0.0, 20.0], [2.0, 0.0], [2.0, 0.0]]
    model = constant_head_model(logits)
    features = [torch.randn(2, 3, 4, 4)]
    pred = predict_segmentation(model, features, (8, 6), 0.1)
    assert isinstance(pred, SegmentationPrediction)
    assert torch.tensor(logits).mean(0).argmax() == 1
    assert pred.labels.dtype == torch.int64 and pred.labels.shape == (2, 8, 6)
    assert (pred.labels == 0).all()
    probs = torch.tensor(logits).softmax(-1)[:, None, :]
    expected = js_uncertainty(probs).item()
    torch.testing.assert_close(pred.pixel_uncertainty, torch.full((2, 8, 6), expected))
    torch.testing.assert_close(pred.score, torch.full((2,), expected))


class FixedHeatmaps:
    """Stands in for a model whose heads output given heatmaps [E, B, K, H, W]."""

    training = False

    def __init__(self, heat: torch.Tensor) -> None:
        self.heat = heat

    def forward_maps(self, features, size):
        return self.heat


def test_keypoints_from_mean_heatmap_with_std_uncertainty():
    kp = torch.tensor([[[3.0, 4.0, 2.0], [8.0, 1.0, 2.0]]])
    clean = gaussian_heatmaps(kp, (10, 12), sigma=1.5)
    gen = torch.Generator().manual_seed(0)
    heat = clean[None] + 0.05 * torch.randn(4, 1, 2, 10, 12, generator=gen)
    pred = predict_keypoints(FixedHeatmaps(heat), [], (10, 12), top_fraction=0.2)
    torch.testing.assert_close(pred.keypoints, decode_heatmaps(heat.mean(0)))
    assert (pred.keypoints[0, :, :2].round() == kp[0, :, :2]).all()
    std = heat.std(dim=0, correction=0).amax(dim=1)
    torch.testing.assert_close(pred.pixel_uncertainty, std)
    torch.testing.assert_close(pred.score, top_fraction_mean(std, 0.2))
    one_head = predict_keypoints(FixedHeatmaps(heat[:1]), [], (10, 12))
    assert (one_head.pixel_uncertainty == 0).all()


def test_predict_keypoints_on_a_real_model():
    model, features = make_model(num_outputs=2), make_features()
    pred = predict_keypoints(model, features, SIZE)
    assert pred.keypoints.shape == (2, 2, 3) and pred.pixel_uncertainty.shape == (2, *SIZE)
    assert pred.score.shape == (2,) and (pred.score > 0).all()


@pytest.mark.parametrize("setting, buffers", [("standardize", ("feature_mean", "feature_std")),
                                               ("prior_correction", ("logit_offset",))])
def test_a_decoder_saved_before_a_setting_loads_as_fitted_without_it(tmp_path, setting, buffers):
    """Decoder files written before the interpreter standardised its inputs (or shifted its logits by
    the class prior) lack those buffers and the setting in their config: they load with the identity
    (mean 0 and std 1, offset 0), which is what they were fitted with, and their config reads the
    setting as off; any other missing tensor, or the buffers missing from a file whose config has the
    setting, is still an error."""
    import json
    from dataclasses import asdict

    from factory.config import DecoderConfig
    from factory.decoders.files import MODEL_FILE, load_decoder, save_decoder

    model = make_model()
    cfg = DecoderConfig(num_heads=3, hidden=[8, 6])
    save_decoder(str(tmp_path), model, cfg, ["a", "b", "c", "d"], [c for c, _ in TAPS], "hash", "")
    path = tmp_path / MODEL_FILE
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = {k: v for k, v in load_file(path).items() if k not in buffers}
    old = {k: v for k, v in asdict(cfg).items() if k != setting}
    save_file(tensors, path, metadata={**metadata, "decoder": json.dumps(old)})
    fitted = load_decoder(str(tmp_path))
    loaded = fitted.model
    assert loaded.feature_mean.eq(0).all() and loaded.feature_std.eq(1).all() and loaded.logit_offset.eq(0).all()
    assert not getattr(fitted.cfg, setting)  # read as fitted with the setting off
    features = make_features()
    torch.testing.assert_close(loaded.forward_maps(features, SIZE), model.forward_maps(features, SIZE))
    save_file({k: v for k, v in tensors.items() if k != "linears.0.bias"}, path, metadata=metadata)
    with pytest.raises(ValueError, match="linears.0.bias"):
        load_decoder(str(tmp_path))
    save_file(tensors, path, metadata=metadata)  # a file of the setting's time without its buffers
    with pytest.raises(ValueError, match=buffers[0]):
        load_decoder(str(tmp_path))
