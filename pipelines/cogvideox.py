"""CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``): joint self-attention in ``transformer_blocks.*.attn1``.

Each block concatenates ``[text, video]`` (text FIRST: the T5 prompt, 226 tokens in the real pipelines, not masked:
padding tokens are attended like any other, so there is no ``text_valid``) and runs one self-attention over both.
The video part is raster frame-major over the grid after patching:

* CogVideoX 1.0 (2B, 5B): per-frame 2-D patches, ``(F, H/p, W/p)``;
* CogVideoX 1.5: a temporal patch too (``patch_size_t``, 2), ``(F/p_t, H/p, W/p)``; the pipeline pads the latent
  frames to a multiple of ``p_t`` before the transformer, and the patch embedding floors ``F/p_t``.

The grid is read from ``hidden_states`` ``(B, F, C, H, W)`` and the config's patch sizes; the text length from
``encoder_hidden_states``. The processor mirrors diffusers' ``CogVideoXAttnProcessor2_0`` (0.42; ``FusedCogVideoXAttnProcessor2_0`` when the
module's projections are fused): q/k/v in
``(B, H, S, D)``, layer-norm qk-norm, the pipeline's RoPE (``image_rotary_emb``, 5B / 1.5 only) on the video part,
and a direct ``F.scaled_dot_product_attention`` call, which is what ``dense_fn`` does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Core, ForwardInputs, ModelFamily


def apply_rotary_emb(x: torch.Tensor, freqs: Any) -> torch.Tensor:
    """diffusers' ``embeddings.apply_rotary_emb`` (the function the stock processor imports), typed for mypy."""
    from diffusers.models.embeddings import apply_rotary_emb as _apply

    return _apply(x, freqs)  # type: ignore[return-value]


class CogVideoXFamily(ModelFamily):
    name = "cogvideox"
    class_names = ("CogVideoXTransformer3DModel",)
    text_position = "first"
    self_attention_paths = ("transformer_blocks.*.attn1",)
    description = "CogVideoX 1.0 / 1.5 text/image-to-video (joint attention, text first)"

    def patch_size(self, transformer: Any) -> list[int]:
        cfg = transformer.config
        p = int(cfg.patch_size)
        p_t = cfg.patch_size_t
        return [int(p_t) if p_t is not None else 1, p, p]

    def read_inputs(self, transformer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardInputs:
        a = self.bind_arguments(transformer, args, kwargs)
        hs = a["hidden_states"]
        ehs = a["encoder_hidden_states"]
        if hs.dim() != 5:
            raise ValueError(f"CogVideoX expects hidden_states (B, F, C, H, W), got shape {tuple(hs.shape)}")
        p_t, p, _ = self.patch_size(transformer)
        f, h, w = int(hs.shape[1]), int(hs.shape[3]), int(hs.shape[4])
        # CogVideoXPatchEmbed: Conv2d(stride p) per frame (1.0) or a reshape into p_t x p x p patches (1.5): floor
        grid = (f // p_t, h // p, w // p)
        return ForwardInputs(
            timestep=a.get("timestep"),
            grid=grid,
            num_text=int(ehs.shape[1]),
            text_first=True,
            batch_size=int(hs.shape[0]),
        )

    def attention(
        self,
        proc: Any,
        core: Core,
        attn: Any,  # diffusers.models.attention_processor.Attention
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rotary_emb: Any,
        **extra: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # mirrors diffusers 0.42.1 CogVideoXAttnProcessor2_0.__call__ line for line; only the SDPA call goes via core
        if encoder_hidden_states is None:
            raise RuntimeError(
                "dit-sparse's CogVideoX processor needs encoder_hidden_states (joint attention)"
            )
        image_rotary_emb = rotary_emb
        text_seq_length = encoder_hidden_states.size(1)

        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        # after transformer.fuse_qkv_projections() the stock processor is FusedCogVideoXAttnProcessor2_0, which
        # differs only here: one to_qkv projection, and (sic) the text length as the mask's target length
        fused = bool(getattr(attn, "fused_projections", False)) and getattr(attn, "to_qkv", None) is not None
        if fused:
            batch_size, sequence_length, _ = encoder_hidden_states.shape
        else:
            batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if fused:
            qkv = attn.to_qkv(hidden_states)
            split_size = qkv.shape[-1] // 3
            query, key, value = torch.split(qkv, split_size, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # Apply RoPE if needed
        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        def dense() -> torch.Tensor:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

        reason = None
        if attention_mask is not None:
            # no diffusers pipeline passes one; an arbitrary mask cannot be honoured by a block mask
            reason = "CogVideoX self-attention got an attention_mask, which the sparse kernel cannot apply"
        hidden_states = core(query, key, value, dense, layout="bhsd", dense_reason=reason)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


FAMILY = CogVideoXFamily()
