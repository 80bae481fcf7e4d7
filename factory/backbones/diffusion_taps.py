"""Feature taps on a diffusion denoiser (a UNet or a diffusion transformer), through diffusers' own
extension points, never a patched copy of the model:

- a forward pre-hook on the denoiser counts its calls (one per sampling step) and reads the latent
  grid of the call (and, for FLUX, how many text tokens lead its single-stream sequence);
- forward hooks on the configured blocks record their outputs: a UNet block's [B, C, h, w] map, or
  a transformer block's image-token hidden states [B, h*w, C] reshaped to [B, C, h, w] (the text
  tokens of joint blocks come out separately and are dropped);
- attention processors wrapping the stock ones record the image->text attention probabilities per
  prompt token (averaged over heads), then hand the layer to the stock processor, so the images are
  exactly what the bare pipeline makes. For joint attention only the image->text slice of the
  softmax over all keys is kept, computed a chunk of queries at a time.

The taps record only at the configured calls (sampling steps), only the conditional half of a
classifier-free-guidance batch. `finish()` groups the maps by resolution (block outputs, then the
mean attention map of that resolution) and concatenates each group across the tapped steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

CallInfo = Callable[[tuple, dict], tuple[tuple[int, int], int]]
"""(args, kwargs) of a denoiser call -> ((h, w) of its image-token grid, number of text tokens)."""

QUERY_CHUNK = 1024
"""Image queries per chunk when computing image->text attention of a joint attention layer."""


def robust_normalise(x: torch.Tensor) -> torch.Tensor:
    """Per sample and channel over positions: (x - median) / (1.4826 * MAD), so the few channels of
    a diffusion transformer that carry "massive activations" do not swamp the others."""
    flat = x.flatten(2)
    median = flat.median(dim=-1, keepdim=True).values
    mad = (flat - median).abs().median(dim=-1, keepdim=True).values
    return ((flat - median) / (1.4826 * mad + 1e-6)).view_as(x)


class FeatureTap:
    """Records block outputs and attention maps during the armed calls of one denoiser."""

    def __init__(self, denoiser: torch.nn.Module, blocks: Sequence[torch.nn.Module], call_info: CallInfo,
                 tokens: bool, max_tokens: int, first_token: int, normalise: bool) -> None:
        """`tokens`: blocks output image tokens [B, N, C] (transformers) rather than maps;
        `first_token`: the first prompt token kept in attention maps (1 skips CLIP's start token)."""
        self.call_info, self.tokens, self.normalise = call_info, tokens, normalise
        self.max_tokens, self.first_token = max_tokens, first_token
        self.armed = False
        self.targets: list[int] = []
        self.calls = 0
        self.keep = slice(None)
        self.grid = (0, 0)
        self.text_len = 0
        self.blocks: dict[int, list[torch.Tensor]] = {}
        self.attention: dict[int, dict[tuple[int, int], list[torch.Tensor]]] = {}
        denoiser.register_forward_pre_hook(self._on_call, with_kwargs=True)
        for block in blocks:
            block.register_forward_hook(self._on_block)

    def start(self, batch: int, guided: bool, calls: Sequence[int]) -> None:
        """Record the given denoiser calls from now on (0 = the next one), keeping the last `batch`
        rows (the conditional half of a guided batch)."""
        self.calls, self.targets = 0, sorted(set(calls))
        self.keep = slice(batch, 2 * batch) if guided else slice(0, batch)
        self.blocks, self.attention = {}, {}

    def finish(self) -> list[torch.Tensor]:
        """One [B, C, h, w] float32 map per resolution, finest first, steps concatenated in order."""
        missing = [c for c in self.targets if c not in self.blocks and c not in self.attention]
        if missing or not self.targets:
            raise RuntimeError(f"no denoiser call number {missing or self.targets} happened; nothing was recorded")
        per_step = []
        for call in self.targets:
            groups: dict[tuple[int, int], list[torch.Tensor]] = {}
            for x in self.blocks.get(call, []):
                x = x.float()
                groups.setdefault(tuple(x.shape[-2:]), []).append(robust_normalise(x) if self.normalise else x)
            for hw, maps in self.attention.get(call, {}).items():
                groups.setdefault(hw, []).append(torch.stack(maps).float().mean(dim=0))
            per_step.append({hw: torch.cat(maps, dim=1) for hw, maps in groups.items()})
        out = [torch.cat([step[hw] for step in per_step], dim=1) for hw in sorted(per_step[0], reverse=True)]
        self.blocks, self.attention, self.targets = {}, {}, []
        return out

    def _on_call(self, module, args, kwargs) -> None:
        self.grid, self.text_len = self.call_info(args, kwargs)
        self.armed = self.calls in self.targets
        self.step = self.calls
        self.calls += 1

    def _on_block(self, module, args, output) -> None:
        if not self.armed:
            return
        if self.tokens:  # (text tokens, image tokens) from joint and FLUX single-stream blocks alike
            hidden = output[1][self.keep]
            b, n, c = hidden.shape
            h, w = self.grid
            if n != h * w:
                raise RuntimeError(f"a tapped block gave {n} image tokens for a {h}x{w} grid")
            hidden = hidden.transpose(1, 2).reshape(b, c, h, w)
        else:
            hidden = (output[0] if isinstance(output, tuple) else output)[self.keep]
        self.blocks.setdefault(self.step, []).append(hidden.detach())

    def record_attention(self, probs: torch.Tensor) -> None:
        """probs: [B, h*w, text tokens] for the kept rows, at the call's grid or a UNet level's."""
        b, hw, _ = probs.shape
        gh, gw = self.grid
        scale = math.sqrt(gh * gw / hw)
        h, w = round(gh / scale), round(gw / scale)
        tokens = probs[:, :, self.first_token : self.first_token + self.max_tokens]
        if tokens.shape[-1] < self.max_tokens:  # a tokenizer with a shorter context: pad with zeros
            tokens = torch.nn.functional.pad(tokens, (0, self.max_tokens - tokens.shape[-1]))
        maps = tokens.transpose(1, 2).reshape(b, self.max_tokens, h, w).detach()
        self.attention.setdefault(self.step, {}).setdefault((h, w), []).append(maps)


def text_attention(query: torch.Tensor, keys: torch.Tensor, text: slice) -> torch.Tensor:
    """query [B, heads, N, D] (image tokens), keys [B, heads, S, D] (all tokens) -> [B, N, T]: the
    softmax over all S keys (scaled dot product, as SDPA), its text columns, mean over heads."""
    scale = 1.0 / math.sqrt(query.shape[-1])
    keys = keys.float().transpose(-1, -2)
    out = [(query[:, :, i : i + QUERY_CHUNK].float() @ keys * scale).softmax(dim=-1)[..., text].mean(dim=1)
           for i in range(0, query.shape[2], QUERY_CHUNK)]
    return torch.cat(out, dim=1)


class CrossAttentionMapProcessor:
    """A UNet cross-attention layer (`attn2`) that also records its attention probabilities when the
    tap is armed; the layer's output always comes from diffusers' stock processor."""

    def __init__(self, tap: FeatureTap) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.tap = tap
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if self.tap.armed and encoder_hidden_states is not None and hidden_states.ndim == 3:
            keep = self.tap.keep
            context = encoder_hidden_states[keep]
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            query = attn.head_to_batch_dim(attn.to_q(hidden_states[keep]))
            key = attn.head_to_batch_dim(attn.to_k(context))
            probs = attn.get_attention_scores(query, key, None)  # [B * heads, h*w, tokens]
            b = probs.shape[0] // attn.heads
            self.tap.record_attention(probs.view(b, attn.heads, *probs.shape[1:]).mean(dim=1).float())
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


class JointAttentionMapProcessor:
    """An SD3 joint attention layer (image tokens first, then text) recording image->text attention
    around the stock processor it wraps."""

    def __init__(self, tap: FeatureTap, inner) -> None:
        self.tap, self.inner = tap, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if self.tap.armed and encoder_hidden_states is not None:
            keep = self.tap.keep
            h, e = hidden_states[keep], encoder_hidden_states[keep]

            def heads(x, norm):
                x = x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
                return norm(x) if norm is not None else x

            query = heads(attn.to_q(h), attn.norm_q)
            keys = torch.cat([heads(attn.to_k(h), attn.norm_k), heads(attn.add_k_proj(e), attn.norm_added_k)], dim=2)
            self.tap.record_attention(text_attention(query, keys, slice(h.shape[1], None)))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


class FluxAttentionMapProcessor:
    """A FLUX attention layer recording image->text attention around the stock processor it wraps:
    double-stream layers get text and image separately (text first in the joint sequence);
    single-stream layers get one sequence whose first `tap.text_len` tokens are the text."""

    def __init__(self, tap: FeatureTap, inner) -> None:
        self.tap, self.inner = tap, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if self.tap.armed:
            from diffusers.models.embeddings import apply_rotary_emb

            keep = self.tap.keep
            h = hidden_states[keep]
            query = attn.norm_q(attn.to_q(h).unflatten(-1, (-1, attn.head_dim)))
            keys = attn.norm_k(attn.to_k(h).unflatten(-1, (-1, attn.head_dim)))
            if encoder_hidden_states is not None:
                e = encoder_hidden_states[keep]
                text_len = e.shape[1]
                keys = torch.cat([attn.norm_added_k(attn.add_k_proj(e).unflatten(-1, (-1, attn.head_dim))), keys], dim=1)
            else:
                text_len = self.tap.text_len
                query = query[:, text_len:]
            if image_rotary_emb is not None:
                cos, sin = image_rotary_emb
                query = apply_rotary_emb(query, (cos[text_len:], sin[text_len:]), sequence_dim=1)
                keys = apply_rotary_emb(keys, image_rotary_emb, sequence_dim=1)
            self.tap.record_attention(text_attention(query.transpose(1, 2), keys.transpose(1, 2), slice(0, text_len)))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
