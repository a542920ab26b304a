"""PixArt-α / PixArt-Σ (``PixArtTransformer2DModel``): image-only self-attention in ``transformer_blocks.*.attn1``.

Each ``BasicTransformerBlock`` runs self-attention (``attn1``) over the image tokens only (raster order over the
patched latent, grid ``(1, H/p, W/p)`` read from ``hidden_states`` ``(B, C, H, W)``) and cross-attention
(``attn2``) to the T5 text, which dit-sparse leaves to diffusers' stock processor. Both use the legacy
``Attention`` class with ``AttnProcessor2_0``, which calls ``F.scaled_dot_product_attention`` directly; the processor
below mirrors it (0.42.1) line for line and replaces only that call by ``core(...)``, whose dense path is the same
SDPA call with the same mask. Real checkpoints have head_dim 72 (16 × 72): the kernels pad it.

The transformer has no ``CacheMixin``, so the pipeline never resets hooks: a rising timestep starts a new run.

``PixArtTransformer2DModel.forward`` accepts an optional self-attention ``attention_mask`` (a key mask over image
tokens; the PixArt pipelines never pass one). The sparse kernel cannot apply an arbitrary key mask, so a layer that
runs sparse with such a mask raises instead of ignoring it; dense layers and steps apply it as diffusers does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Core, ForwardInputs, ModelFamily


class PixArtFamily(ModelFamily):
    name = "pixart"
    class_names = ("PixArtTransformer2DModel",)
    text_position = "none"
    self_attention_paths = ("transformer_blocks.*.attn1",)
    description = (
        "PixArt-α / PixArt-Σ text-to-image (self-attention over image tokens, text via cross-attention)"
    )

    @property
    def resets_each_run(self) -> bool:
        return False  # no CacheMixin: the pipeline never resets hooks, a rising timestep starts a new run

    def dense_processor(self, module: torch.nn.Module) -> Any:
        # what diffusers' legacy Attention.__init__ installs when no processor is given (attn2: cross-attention)
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        return AttnProcessor2_0() if getattr(module, "scale_qk", True) else AttnProcessor()

    def read_inputs(self, transformer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardInputs:
        a = self.bind_arguments(transformer, args, kwargs)
        hs = a["hidden_states"]  # (B, C, H, W) latent, pre-patch
        if hs.dim() != 4:
            raise ValueError(
                f"PixArtTransformer2DModel expects a 4-D latent (B, C, H, W), got {tuple(hs.shape)}"
            )
        p = int(transformer.config.patch_size)
        # as PixArtTransformer2DModel.forward / PatchEmbed: floor(H / p) x floor(W / p) tokens
        grid = (1, int(hs.shape[-2]) // p, int(hs.shape[-1]) // p)
        return ForwardInputs(timestep=a.get("timestep"), grid=grid, batch_size=int(hs.shape[0]))

    def attention(
        self,
        proc: Any,
        core: Core,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rotary_emb: Any,
        **extra: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise RuntimeError(
                "dit-sparse's PixArt processor only handles self-attention (transformer_blocks.*.attn1); "
                "cross-attention (attn2) runs diffusers' AttnProcessor2_0"
            )
        temb = extra.get("temb")

        # --- diffusers 0.42.1 AttnProcessor2_0.__call__, line for line (encoder_hidden_states is None here). Its
        # deprecated `scale` check is left out: legacy Attention.forward drops `scale` before any processor sees it.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim

        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # scaled_dot_product_attention expects attention_mask shape to be
            # (batch, heads, source_length, target_length)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        encoder_hidden_states = hidden_states

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        ran_dense = []

        def dense() -> torch.Tensor:
            ran_dense.append(True)
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

        # the output of sdp = (batch, num_heads, seq_len, head_dim)
        hidden_states = core(query, key, value, dense, layout="bhsd")
        if attention_mask is not None and not ran_dense:
            raise RuntimeError(
                "dit-sparse: PixArt self-attention got an attention_mask (a key mask over image tokens), which the "
                "sparse kernel cannot apply; run without attention_mask or keep this layer dense in the profile"
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states


FAMILY = PixArtFamily()
