"""A residual StyleGAN2 discriminator, to train our generator (`factory pretrain`).

Written from Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN" (Fig. 7c:
the residual discriminator; Sec. B: equalized learning rate, [1,3,3,1] blurred resampling, minibatch
standard deviation at 4x4); no NVIDIA code is used. Channels per resolution follow the generator's
`StyleGAN2Config.channels`, so both networks grow alike.

    image -> fromRGB (1x1) -> per block r -> r/2:  conv3x3, conv3x3 + downsample, plus a skip of
    downsample + 1x1 conv, summed and scaled by 1/sqrt(2) -> at 4x4: minibatch stddev, conv3x3,
    fully connected, fully connected -> one score per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from factory.backbones.stylegan2 import FullyConnected, seeded_init
from factory.config import StyleGAN2Config

_LRELU_GAIN = math.sqrt(2.0)


def downsample2d(x: Tensor) -> Tensor:
    """Blur with the separable [1,3,3,1] filter and keep every other pixel: exactly H/2 x W/2."""
    c = x.shape[1]
    f = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=x.dtype, device=x.device)
    k = (torch.outer(f, f) / 64.0).expand(c, 1, 4, 4).contiguous()
    return F.conv2d(F.pad(x, (1, 1, 1, 1)), k, stride=2, groups=c)


class Conv2dLayer(nn.Module):
    """Equalized-lr conv (weights stored at unit scale, scaled by 1/sqrt(fan_in) when used), with an
    optional downsampling after it and a gain-corrected leaky ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, bias: bool = True, activate: bool = True,
                 down: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(out_ch)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.activate, self.down, self.padding = activate, down, kernel // 2

    def reset_parameters(self, gen: torch.Generator) -> None:
        self.weight.copy_(torch.randn(self.weight.shape, generator=gen))
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight * self.weight_gain, padding=self.padding)
        if self.down:
            x = downsample2d(x)
        if self.bias is not None:
            x = x + self.bias.reshape(1, -1, 1, 1)
        return F.leaky_relu(x, 0.2) * _LRELU_GAIN if self.activate else x


class DiscriminatorBlock(nn.Module):
    """r x r -> r/2 x r/2 with a residual skip; the sum is scaled by 1/sqrt(2) to keep its variance."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv0 = Conv2dLayer(in_ch, in_ch, 3)
        self.conv1 = Conv2dLayer(in_ch, out_ch, 3, down=True)
        self.skip = Conv2dLayer(in_ch, out_ch, 1, bias=False, activate=False, down=True)

    def forward(self, x: Tensor) -> Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) / math.sqrt(2.0)


def minibatch_stddev(x: Tensor, group_size: int = 4) -> Tensor:
    """Append one channel: the feature standard deviation across a group of images, averaged, so the
    discriminator can see a lack of variety (mode collapse)."""
    b, c, h, w = x.shape
    g = max(d for d in range(1, min(group_size, b) + 1) if b % d == 0)
    y = x.reshape(g, b // g, c, h, w)
    y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt()
    y = y.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1).repeat(g, 1, h, w)
    return torch.cat([x, y], dim=1)


class StyleGAN2Discriminator(nn.Module):
    """image [B, C, R, R] in [-1, 1] -> realness logit [B]."""

    def __init__(self, cfg: StyleGAN2Config, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        res = cfg.resolution
        self.from_rgb = Conv2dLayer(cfg.img_channels, cfg.channels(res), 1)
        self.resolutions = [r for r in reversed(cfg.block_resolutions) if r > 4]
        for r in self.resolutions:
            setattr(self, f"b{r}", DiscriminatorBlock(cfg.channels(r), cfg.channels(r // 2)))
        c4 = cfg.channels(4)
        self.conv = Conv2dLayer(c4 + 1, c4, 3)
        self.fc = FullyConnected(c4 * 16, c4, activate=True)
        self.out = FullyConnected(c4, 1)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        seeded_init(self, seed)

    def forward(self, image: Tensor) -> Tensor:
        x = self.from_rgb(image)
        for r in self.resolutions:
            x = getattr(self, f"b{r}")(x)
        x = self.conv(minibatch_stddev(x))
        return self.out(self.fc(x.flatten(1))).squeeze(1)
