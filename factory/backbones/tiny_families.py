"""Tiny SDXL, SD3 and FLUX pipelines built from configs with seeded random weights.

The siblings of `tiny_diffusion.build_tiny_pipeline` (SD 1.x/2.x) for the other families a
`backbone.weights` folder may hold: the real diffusers classes (UNet2DConditionModel with SDXL's
added time embedding, SD3Transformer2DModel, FluxTransformer2DModel, CLIP and T5 text encoders) at a
few hundred kilobytes each, for tests and benchmarks. Saved with `save_pretrained`, they load back
through the same `from_pretrained` path a user's checkpoint takes. Tokenizers are made offline: the
CLIP ones from `tiny_diffusion.write_tokenizer_files`, the T5 one as a Unigram vocabulary of
`tiny_diffusion.WORDS` plus single letters (so unknown words are spelled out).
"""

from __future__ import annotations

import os
import tempfile

import torch

from factory.backbones.tiny_diffusion import WORDS, build_tiny_pipeline, latent_scaling_factor, write_tokenizer_files

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY_FAMILIES = ("sd", "sdxl", "sd3", "flux")
"""The families `build_tiny` makes, by short name (the pipeline class is what the folder records)."""


def clip_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        vocab_size = write_tokenizer_files(d)
        return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=77), vocab_size


def clip_text_encoder(vocab_size: int, hidden: int, projection: int | None = None):
    """A 2-layer CLIP text encoder; with `projection`, the `WithProjection` variant (pooled embeds)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                            hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                            num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77,
                            projection_dim=projection or hidden)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def t5_tokenizer():
    """A T5 (Unigram) tokenizer: <pad> </s> <unk>, the tiny words whole, then letters."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def t5_text_encoder(vocab_size: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_heads=4,
                                   num_layers=2, relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()


def tiny_vae(latent_channels: int, **kwargs):
    """VAE factor 2 (64 px images, 32 px latents), its latent scale measured as tiny_diffusion does."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=latent_channels, norm_num_groups=4, sample_size=64, **kwargs)
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae))
    return vae


def build_tiny_sdxl(seed: int = 0):
    """StableDiffusionXLPipeline: two CLIP text encoders (the second with projection: pooled embeds),
    a UNet with SDXL's `text_time` added embedding (pooled text + 6 size/crop ids)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
        norm_num_groups=4,
    )
    vae = tiny_vae(4)
    tokenizer, vocab_size = clip_tokenizer()
    tokenizer_2, _ = clip_tokenizer()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=clip_text_encoder(vocab_size, 32), text_encoder_2=clip_text_encoder(vocab_size, 32, 32),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_sd3(seed: int = 0):
    """StableDiffusion3Pipeline: an MM-DiT of 2 joint blocks (patch 2), two CLIP encoders with
    projection (pooled 64) and a T5 encoder (64 wide), flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32,
    )
    vae = tiny_vae(4, shift_factor=0.0)
    tokenizer, vocab_size = clip_tokenizer()
    tokenizer_2, _ = clip_tokenizer()
    tokenizer_3 = t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_text_encoder(vocab_size, 32, 32), tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(vocab_size, 32, 32), tokenizer_2=tokenizer_2,
        text_encoder_3=t5_text_encoder(len(tokenizer_3), 64), tokenizer_3=tokenizer_3,
    )


def build_tiny_flux(seed: int = 0):
    """FluxPipeline: 1 double-stream and 2 single-stream blocks, a CLIP encoder (pooled 32) and a T5
    encoder (32 wide), embedded guidance (as FLUX.1-dev), 2x2 latent packing, flow matching with the
    resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True,
    )
    vae = tiny_vae(4, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False)
    tokenizer, vocab_size = clip_tokenizer()
    tokenizer_2 = t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        transformer=transformer.eval(), scheduler=scheduler, vae=vae,
        text_encoder=clip_text_encoder(vocab_size, 32), tokenizer=tokenizer,
        text_encoder_2=t5_text_encoder(len(tokenizer_2), 32), tokenizer_2=tokenizer_2,
    )


def build_tiny(family: str, seed: int = 0):
    """The tiny pipeline of `family` ("sd", "sdxl", "sd3" or "flux")."""
    builders = {"sd": build_tiny_pipeline, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}
    if family not in builders:
        raise ValueError(f"no tiny pipeline for family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    return builders[family](seed)


def save_tiny(directory: str, family: str, seed: int = 0) -> str:
    """Build the tiny `family` pipeline and `save_pretrained` it to `directory`."""
    build_tiny(family, seed).save_pretrained(directory, safe_serialization=True)
    return directory
