"""GPU checks: the same stages on CUDA. Skipped where no CUDA device is present (CI has none)."""

import numpy as np
import pytest
import torch

from factory import config as config_lib
from factory.backbones import load_backbone
from factory.dataset.sample import decode_png
from factory.decoders import build_decoder
from factory.decoders.files import load_decoder, save_decoder
from factory.recipes.labeling import label_seeds

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_samples_match_cpu_samples(tiny_cfg):
    cpu = load_backbone(tiny_cfg.backbone)
    model = build_decoder(tiny_cfg.decoder, cpu.feature_channels, len(tiny_cfg.labels.classes)).eval()
    save_decoder(tiny_cfg.generate.decoder, model, tiny_cfg.decoder, tiny_cfg.labels.classes,
                 cpu.feature_channels, cpu.weights_hash, config_lib.to_yaml(tiny_cfg))
    rows = {}
    for device in ("cpu", "cuda"):
        backbone = load_backbone(tiny_cfg.backbone, device)
        assert backbone.weights_hash == cpu.weights_hash
        rows[device] = label_seeds(backbone, load_decoder(tiny_cfg.generate.decoder, device), [3, 4], 0, tiny_cfg, "h")
    for a, b in zip(rows["cpu"], rows["cuda"]):
        diff = np.abs(decode_png(a["image"]).astype(int) - decode_png(b["image"]).astype(int))
        assert diff.max() <= 1  # float paths differ across devices; pixels by at most one grey level
        assert (decode_png(a["mask"]) == decode_png(b["mask"])).mean() > 0.99
