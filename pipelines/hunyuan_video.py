"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): joint video + text self-attention, text LAST, padded.

Self-attention layers, in profile order: the dual-stream blocks ``transformer_blocks.*.attn`` (video and text
projected separately, then concatenated), then the single-stream blocks ``single_transformer_blocks.*.attn`` (the
block hands over the already-normed video and text halves, concatenated by the processor). Both lay the sequence
out as ``[video (F'·H'·W', raster frame-major), text (L)]``. The token refiner's attention
(``context_embedder.token_refiner.refiner_blocks.*.attn``, text only) is not sparsified and keeps its stock
``AttnProcessor2_0``.

Text padding: the transformer builds a key-padding mask ``(B, 1, 1, N)`` that keeps the first
``encoder_attention_mask.sum()`` text tokens of each sample (pads assumed at the end). The processor passes that
mask's text part to the core as ``text_valid``, so padded keys are dropped from the sparse attention exactly as the
model drops them. The grid is read from ``hidden_states`` ``(B, C, F, H, W)`` with the model's own floor division by
``(patch_size_t, patch_size, patch_size)``. The processor mirrors diffusers' ``HunyuanVideoAttnProcessor2_0``
(0.42.1) line for line (``apply_rotary_emb`` on the video part only); only the core attention call changes.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Core, ForwardInputs, ModelFamily, project_heads


def _text_valid(attention_mask: torch.Tensor | None, num_text: int) -> torch.Tensor | None:
    """``(B, num_text)`` bool from the model's key-padding mask ``(B, 1, 1, N)`` (text last); None without text."""
    if attention_mask is None or num_text == 0:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[-2] != 1:
        raise RuntimeError(
            "dit-sparse's HunyuanVideo processor expects the transformer's boolean key-padding mask of shape "
            f"(B, 1, 1, N), got {attention_mask.dtype} {tuple(attention_mask.shape)}"
        )
    return attention_mask[:, 0, 0, -num_text:]


class HunyuanVideoFamily(ModelFamily):
    name = "hunyuan_video"
    class_names = ("HunyuanVideoTransformer3DModel",)
    text_position = "last"
    self_attention_paths = ("transformer_blocks.*.attn", "single_transformer_blocks.*.attn")
    description = "HunyuanVideo text/image-to-video (dual- then single-stream joint attention, text last)"

    def patch_size(self, transformer: Any) -> list[int]:
        c = transformer.config
        return [int(c.patch_size_t), int(c.patch_size), int(c.patch_size)]

    def read_inputs(self, transformer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardInputs:
        a = self.bind_arguments(transformer, args, kwargs)
        hs = a["hidden_states"]
        pt, p, _ = self.patch_size(transformer)
        # the model's own arithmetic (Conv3d patch embed and RoPE both floor)
        grid = (int(hs.shape[2]) // pt, int(hs.shape[3]) // p, int(hs.shape[4]) // p)
        text = a["encoder_hidden_states"]
        num_text = int(text.shape[1])
        mask = a.get("encoder_attention_mask")
        text_valid = None
        if mask is not None:
            # as HunyuanVideoTransformer3DModel.forward: the first sum(mask) text tokens are kept, the rest masked
            effective = mask.sum(dim=1, dtype=torch.int)
            valid = torch.arange(num_text, device=mask.device).unsqueeze(0) < effective.unsqueeze(1)
            text_valid = None if bool(valid.all()) else valid
        return ForwardInputs(
            timestep=a.get("timestep"),
            grid=grid,
            num_text=num_text,
            text_first=False,
            text_valid=text_valid,
            batch_size=int(hs.shape[0]),
        )

    def dense_processor(self, module: torch.nn.Module) -> Any:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        joint = getattr(module, "add_q_proj", None) is not None or getattr(module, "pre_only", False)
        if joint:
            return HunyuanVideoAttnProcessor2_0()
        # token refiner: the default processor diffusers' Attention.__init__ installs
        return AttnProcessor2_0() if getattr(module, "scale_qk", True) else AttnProcessor()

    def attention(
        self,
        proc: Any,
        core: Core,
        attn: Any,  # diffusers' Attention / MochiAttention
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rotary_emb: Any,
        **extra: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb as _apply_rotary_emb

        apply_rotary_emb: Any = _apply_rotary_emb  # typed tensor-or-tuple; a tensor here (use_real)

        image_rotary_emb = rotary_emb
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        # 1. QKV projections, 2. QK normalization
        query, key, value = project_heads(attn, hidden_states)

        # 3. Rotational positional embeddings applied to latent stream
        if image_rotary_emb is not None:
            if attn.add_q_proj is None and encoder_hidden_states is not None:
                query = torch.cat(
                    [
                        apply_rotary_emb(
                            query[:, : -encoder_hidden_states.shape[1]], image_rotary_emb, sequence_dim=1
                        ),
                        query[:, -encoder_hidden_states.shape[1] :],
                    ],
                    dim=1,
                )
                key = torch.cat(
                    [
                        apply_rotary_emb(
                            key[:, : -encoder_hidden_states.shape[1]], image_rotary_emb, sequence_dim=1
                        ),
                        key[:, -encoder_hidden_states.shape[1] :],
                    ],
                    dim=1,
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # 4. Encoder condition QKV projection and normalization
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query, encoder_key, encoder_value = project_heads(attn, encoder_hidden_states, added=True)

            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        # 5. Attention: sequence is [video, text]; the model's key-padding mask marks padded text keys
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

        num_text = 0 if encoder_hidden_states is None else int(encoder_hidden_states.shape[1])
        hidden_states = core(
            query, key, value, dense, layout="bshd", text_valid=_text_valid(attention_mask, num_text)
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        # 6. Output projection
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : -encoder_hidden_states.shape[1]],
                hidden_states[:, -encoder_hidden_states.shape[1] :],
            )

            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)

            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        return hidden_states, encoder_hidden_states


FAMILY = HunyuanVideoFamily()
