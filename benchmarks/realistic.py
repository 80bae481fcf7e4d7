"""Realistic-size diffusers pipelines with seeded random weights, for `diffusion.py --realistic` on a GPU.

The shapes of the public checkpoints (their configs, not their weights), built from the real diffusers
and transformers classes:

- `sd`: SD 1.5: UNet 320/640/1280/1280, 2 layers per block, cross-attention 768, head dim 8 (its
  config's heads); VAE 128/256/512/512; CLIP-L text encoder (768 wide, 12 layers). 512 px.
- `sdxl`: SDXL base: UNet 320/640/1280 with 1/2/10 transformer layers per block, 5/10/20 heads,
  cross-attention 2048, the `text_time` added embedding (pooled 1280 + 6 ids x 256); CLIP-L and
  OpenCLIP-bigG (1280 wide, 32 layers, projection 1280); the SD VAE with SDXL's latent scale. 1024 px.
- `flux`: FLUX.1-dev: 19 double-stream + 38 single-stream blocks at hidden 3072 (24 heads x 128),
  joint attention 4096, pooled 768, embedded guidance, RoPE axes 16/56/56 (about 12B parameters,
  24 GB in bfloat16: fits one H200 twice, the bare pipeline beside the backbone's); the 16-channel
  VAE; CLIP-L; a T5 encoder at T5-XXL's width (4096, 64 heads, d_ff 10240) with 2 of its 24 layers
  (the text encoders run once per prompt, not per step, and the same in both phases: they move
  the labeled/bare ratio little, while 4.7B more parameters would cost minutes of building, saving,
  hashing and loading). 1024 px.

Tokenizers are the tiny offline ones (`tiny_families`): the text encoders' widths and depths are the
real ones, their embedding tables small. `smoke=True` builds each family at toy sizes with the same
code (same classes, same block structure, a few channels), so a CPU test proves the GPU run works.
Weights are initialised on `device` (seconds on a GPU for 12B parameters, minutes on a CPU).
"""

from __future__ import annotations

import torch

REALISTIC_FAMILIES = ("sd", "sdxl", "flux")
RESOLUTION = {"sd": 512, "sdxl": 1024, "flux": 1024}
"""Pixels per side each family was trained at (smoke: 64)."""


def clip(vocab_size: int, hidden: int, layers: int, heads: int, projection: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act=act, projection_dim=projection or hidden,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return (CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)).eval()


def vae(smoke: bool, latent_channels: int, scaling: float, **kwargs):
    from diffusers import AutoencoderKL

    channels = (8, 16, 16, 16) if smoke else (128, 256, 512, 512)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=2,
                         block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4 if smoke else 32,
                         sample_size=64 if smoke else 1024, scaling_factor=scaling, **kwargs).eval()


def build_sd(smoke: bool):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from factory.backbones.tiny_families import clip_tokenizer

    tokenizer, vocab = clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8 if smoke else 64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64) if smoke else (320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32 if smoke else 768, attention_head_dim=2 if smoke else 8, norm_num_groups=32,
    )
    with torch.device("cpu"):  # schedules stay on the CPU, whatever device the weights are made on
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae(smoke, 4, 0.18215), text_encoder=clip(vocab, 32, 2, 4) if smoke else clip(vocab, 768, 12, 12),
        tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl(smoke: bool):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from factory.backbones.tiny_families import clip_tokenizer

    tokenizer, vocab = clip_tokenizer()
    tokenizer_2, _ = clip_tokenizer()
    if smoke:
        text, text_2 = clip(vocab, 32, 2, 4), clip(vocab, 32, 2, 4, projection=32, act="gelu")
    else:
        text, text_2 = clip(vocab, 768, 12, 12), clip(vocab, 1280, 32, 20, projection=1280, act="gelu")
    time_dim = 8 if smoke else 256
    unet = UNet2DConditionModel(
        sample_size=8 if smoke else 128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64) if smoke else (320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2) if smoke else (1, 2, 10),
        attention_head_dim=(2, 4, 4) if smoke else (5, 10, 20), use_linear_projection=True,
        cross_attention_dim=text.config.hidden_size + text_2.config.hidden_size,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_2.config.projection_dim, norm_num_groups=32,
    )
    with torch.device("cpu"):
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae(smoke, 4, 0.13025), text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


def build_flux(smoke: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from factory.backbones.tiny_families import clip_tokenizer, t5_tokenizer

    tokenizer, vocab = clip_tokenizer()
    tokenizer_2 = t5_tokenizer()
    text = clip(vocab, 32, 2, 4) if smoke else clip(vocab, 768, 12, 12)
    width, heads, d_ff = (32, 4, 64) if smoke else (4096, 64, 10240)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=width, d_ff=d_ff, d_kv=width // heads,
                                 num_heads=heads, num_layers=2, feed_forward_proj="gated-gelu",
                                 decoder_start_token_id=0)).eval()
    if smoke:
        shape = {"num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                 "axes_dims_rope": (4, 4, 8)}
    else:
        shape = {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
                 "axes_dims_rope": (16, 56, 56)}
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, joint_attention_dim=width,
                                         pooled_projection_dim=text.config.hidden_size, guidance_embeds=True, **shape)
    with torch.device("cpu"):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        transformer=transformer.eval(), scheduler=scheduler,
        vae=vae(smoke, 16, 0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
    )


def build_realistic(family: str, smoke: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32,
                    seed: int = 0):
    """The realistic-size pipeline of `family` (smoke: toy sizes), weights seeded and made on `device`,
    then cast to `dtype` (what a GPU run loads it as: half the bytes to save and read)."""
    builders = {"sd": build_sd, "sdxl": build_sdxl, "flux": build_flux}
    if family not in builders:
        raise ValueError(f"no realistic pipeline for family {family!r}; choose one of {', '.join(REALISTIC_FAMILIES)}")
    torch.manual_seed(seed)
    with torch.device(device):
        pipe = builders[family](smoke)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
