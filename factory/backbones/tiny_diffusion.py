"""A tiny Stable Diffusion pipeline built from configs with seeded random weights.

No model hub is reachable from our machines or CI, so the embedded default and the tests use this
pipeline: the real diffusers classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, a
CLIPTokenizer) at a few hundred kilobytes. Saved with `save_pretrained`, it loads back through the
same `from_pretrained` path a user's SD 1.x/2.x checkpoint takes.

The tokenizer is byte-level BPE like CLIP's, with a hand-made vocabulary: every byte, plus whole-word
tokens for `WORDS` (built as a chain of merges), so prompts about the demo's classes tokenize to words
and their cross-attention maps mean something.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # torchvision-missing notices on import

WORDS = (
    "a an the of and with in on photo picture painting render image scene close up small large "
    "red green blue yellow white black bright dark background object objects shape circle square "
    "disc box ball ring bar cat dog person car bird road sky tree face hair brown blond grey bald "
    "smiling looking left right"
).split()
"""Words the tiny tokenizer knows whole; anything else is spelled out byte by byte."""


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_tokenizer_files(directory: str, words: tuple[str, ...] | list[str] = WORDS) -> int:
    """vocab.json + merges.txt for a CLIPTokenizer in `directory`; returns the vocabulary size."""
    alphabet = list(bytes_to_unicode().values())
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    known = set(vocab)
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merged = current + piece
            if merged not in known:
                merges.append(f"{current} {piece}")
                vocab.append(merged)
                known.add(merged)
            current = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def build_tiny_pipeline(seed: int = 0):
    """A StableDiffusionPipeline of seeded random weights: VAE factor 2 (64 px images, 32 px
    latents), a two-level UNet with cross-attention at 16 px, a 2-layer CLIP text encoder and a
    word-level tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        # cross-attention at the coarse level only: at 32x32 latents it costs 6x the whole UNet
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae))
    with tempfile.TemporaryDirectory() as d:
        vocab_size = write_tokenizer_files(d)
        tokenizer = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=vocab_size,
            max_position_embeddings=77,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def calibration_images(num: int = 16, size: int = 64, seed: int = 0) -> torch.Tensor:
    """[num, 3, size, size] in [-1, 1]: seeded scenes of smooth colour fields and a few flat shapes
    with sharp edges, the statistics a VAE's latent scale is measured on."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num, 3, 4, 4, generator=gen) * 2 - 1
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    grid = (torch.arange(size) + 0.5) / size
    for _ in range(3):
        centre, radius = torch.rand(num, 2, generator=gen), 0.1 + 0.25 * torch.rand(num, generator=gen)
        colour = torch.rand(num, 3, generator=gen) * 2 - 1
        inside = ((grid[None, :, None] - centre[:, 1, None, None]) ** 2
                  + (grid[None, None, :] - centre[:, 0, None, None]) ** 2) < radius[:, None, None] ** 2
        x = torch.where(inside[:, None], colour[:, :, None, None], x)
    return x.clamp(-1, 1)


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor | None = None) -> float:
    """1 / std of the VAE's latents on `images` ([B, 3, H, W] in [-1, 1]; default
    `calibration_images()`), rounded: as SD's 0.18215 was chosen for its VAE, so that latents have
    unit variance and the noise schedule means what it says. (With the default factor a random
    VAE's latents are ~25x too small and drown in noise even at t=1.)"""
    x = calibration_images() if images is None else images
    return round(1.0 / float(vae.encode(x).latent_dist.mean.std()), 4)


def save_tiny_pipeline(directory: str, seed: int = 0) -> str:
    """Build the tiny pipeline and `save_pretrained` it to `directory` (a user-checkpoint layout)."""
    build_tiny_pipeline(seed).save_pretrained(directory, safe_serialization=True)
    return directory
