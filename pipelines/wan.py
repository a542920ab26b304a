"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): video-only self-attention in ``blocks.*.attn1``.

Text enters through cross-attention (``attn2``), so self-attention is all video, raster frame-major. The grid is
read from ``hidden_states`` ``(B, C, F, H, W)`` and the patch size. Wan 2.2 A14B pipelines have a second
transformer (``transformer_2``): ``apply()`` handles both. The processor mirrors diffusers' ``WanAttnProcessor``
(0.42) and reuses the model's own projections, qk-norm and RoPE; only the core attention call changes.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Core, ForwardInputs, ModelFamily, latent_grid


def _rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # exactly diffusers' WanAttnProcessor rotary embedding (interleaved pairs), so dense stays bit-identical
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanFamily(ModelFamily):
    name = "wan"
    class_names = ("WanTransformer3DModel",)
    text_position = "none"
    self_attention_paths = ("blocks.*.attn1",)
    description = "Wan 2.1 / 2.2 text/image-to-video"

    def read_inputs(self, transformer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardInputs:
        a = self.bind_arguments(transformer, args, kwargs)
        hs = a["hidden_states"]
        return ForwardInputs(
            timestep=a.get("timestep"),
            grid=latent_grid(hs, self.patch_size(transformer)),
            batch_size=int(hs.shape[0]),
        )

    def attention(
        self,
        proc: Any,
        core: Core,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rotary_emb: Any,
        **extra: Any,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or getattr(attn, "add_k_proj", None) is not None:
            raise RuntimeError("dit-sparse's Wan processor only handles self-attention (blocks.*.attn1)")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # (B, S, H, D)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _rope(query, *rotary_emb)
            key = _rope(key, *rotary_emb)

        def dense() -> torch.Tensor:
            return dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                dropout_p=0.0,
                is_causal=False,
                backend=proc._attention_backend,
                parallel_config=proc._parallel_config,
            )

        out = core(query, key, value, dense, layout="bshd")
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out


FAMILY = WanFamily()
