"""What every StyleGAN2 checkpoint reader returns (`Checkpoint`), and which reader a file needs,
told from its first bytes (`sniff`), never from its name."""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from factory.backbones.stylegan2 import StyleGAN2Arch

SAFETENSORS, OFFICIAL, ROSINALITY = "safetensors", "official pickle", "rosinality .pt"


NETWORKS = ("G_ema", "G")
"""Which generator of a training snapshot to take: the EMA weights (what every official tool samples
from) or the raw trained ones."""


_LEGACY_TORCH = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]
"""First bytes of a legacy (pre-zip) `torch.save` file: its magic number, pickled."""


_ZIP = b"PK\x03\x04"


@dataclass
class Checkpoint:
    """A generator read from a checkpoint file, in this project's terms."""

    tensors: dict[str, Tensor]
    """Under `StyleGAN2Generator.state_dict()` names (resample filters dropped, noise_const kept)."""
    arch: StyleGAN2Arch
    format: str
    network: str
    """Which generator of the file: "G_ema" or "G" (rosinality: "g_ema" / "g"); "generator" for safetensors."""
    holds: list[str]
    """The file's top-level entries (e.g. ['D', 'G', 'G_ema', 'augment_pipe', 'training_set_kwargs'])."""
    notes: list[str] = field(default_factory=list)
    """What was not read from the file but decided here (e.g. a computed w_avg), or where it came from."""
    w_avg: str = "stored"
    """"stored" (the checkpoint's own), or "computed" when the file has none (see notes)."""


IMG_CHANNELS = (1, 3)
"""Image channels a generator may have to be loaded: RGB, or grayscale (shown as RGB, the gray channel
repeated). Anything else (e.g. RGBA) has no place in the images, shards and previews downstream."""


def check_img_channels(arch: StyleGAN2Arch, where: str) -> None:
    """Refuse a generator whose images are neither RGB nor grayscale, naming `where` (the file)."""
    if arch.img_channels not in IMG_CHANNELS:
        raise ValueError(f"{where} has img_channels={arch.img_channels}; only 1 (grayscale, shown as RGB) and 3 "
                         f"(RGB) are supported")


def error_line(error: BaseException) -> str:
    """The line of an error's message that says what went wrong. torch's weights-only errors open with
    advice (in terminal colours) and name the cause on a later `WeightsUnpickler error:` line."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    cause = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    return (cause or lines or [""])[0].split(" Please use")[0]


def unreadable(path: str, what: str, error: BaseException) -> ValueError:
    """The one refusal of a file whose bytes do not parse as `what`: one line naming the file and the
    parser's own error (any error: nothing from the file is executed, so a failure is the bytes')."""
    kind = type(error)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__.lstrip('_')}.{kind.__name__}"
    return ValueError(f"{path} is not a readable {what} (truncated or corrupt): {name}: {error_line(error)}")


def sniff(path: str) -> str:
    """The format of the file at `path`, from its first bytes (never from its name)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"StyleGAN2 weights file {path} not found")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP) or head.startswith(_LEGACY_TORCH):
        return ROSINALITY
    if len(head) >= 9 and head[8:9] == b"{":
        return SAFETENSORS  # an 8-byte header length, then the JSON header
    if head[:1] == b"\x80":
        return OFFICIAL
    what = "an empty file" if not head else f"a file starting with {head[:8]!r}"
    raise ValueError(f"{path} is {what}, not a StyleGAN2 checkpoint (official pickle, rosinality .pt, or "
                     f"this project's safetensors)")


_FIR = torch.outer(torch.tensor([1.0, 3.0, 3.0, 1.0]), torch.tensor([1.0, 3.0, 3.0, 1.0]))


def is_standard_fir(t: Tensor) -> bool:
    """Whether a stored resampling filter is [1,3,3,1] (separable, any normalisation)."""
    return tuple(t.shape) == (4, 4) and bool(torch.allclose(t.float() / t.float().sum(), _FIR / _FIR.sum(), atol=1e-6))
