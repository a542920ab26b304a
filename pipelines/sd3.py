"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): joint attention in ``transformer_blocks.*.attn``.

Each MMDiT block runs one joint self-attention over ``[image, text]``: the image tokens (raster order over the
patched latent, ``(1, H/p, W/p)``) come first and the text tokens (77 CLIP + 256 T5 = 333 for the real pipelines)
LAST, exactly as diffusers' ``JointAttnProcessor2_0`` concatenates them. SD3 has no text padding mask (padded
prompt tokens are real inputs the model attends to), so ``text_valid`` is always ``None``. The last block has
``context_pre_only=True``: its attention still attends over ``[image, text]`` but the text output is not projected
(``to_add_out`` is skipped) and the block drops it; the processor below mirrors that unchanged.

SD3.5-Medium's dual-attention blocks (``dual_attention_layers``, blocks 0-12) add a second, image-only
self-attention ``transformer_blocks.*.attn2`` (same processor, ``encoder_hidden_states=None``). Those are profile
layers too, listed after all the joint layers: a profile's layer ``i < num_blocks`` is ``transformer_blocks.{i}.attn``
and the following ones are the ``attn2`` layers in block order. They run with no text (``num_text=0`` for the call).

The transformer has no ``CacheMixin``, so the pipeline never resets hooks: a rising timestep starts a new run.
The processor mirrors diffusers' ``JointAttnProcessor2_0`` (0.42.1), which calls ``F.scaled_dot_product_attention``
directly; only that call is replaced by ``core(...)``, whose dense path is the very same SDPA call. After
``transformer.fuse_qkv_projections()`` the stock processor is ``FusedJointAttnProcessor2_0`` (one fused matmul, and
it skips qk-norm); the sparsified layers then compute q/k/v with the unfused ``to_q``/``to_k``/``to_v`` as
``JointAttnProcessor2_0`` does, so dense equals the unfused model, not the fused one bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Core, ForwardInputs, ModelFamily


class SD3Family(ModelFamily):
    name = "sd3"
    class_names = ("SD3Transformer2DModel",)
    text_position = "last"
    # the joint attention of every block, then SD3.5-M's image-only ``attn2`` layers (see the module docstring)
    self_attention_paths = ("transformer_blocks.*.attn", "transformer_blocks.*.attn2")
    description = "Stable Diffusion 3 / 3.5 text-to-image (MMDiT joint attention, text last)"

    @property
    def resets_each_run(self) -> bool:
        return False  # no CacheMixin: the pipeline never resets hooks, a rising timestep starts a new run

    def dense_processor(self, module: torch.nn.Module) -> Any:
        # every attention module of SD3Transformer2DModel (attn and the dual-attention attn2) uses this processor
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        return JointAttnProcessor2_0()

    def read_inputs(self, transformer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardInputs:
        a = self.bind_arguments(transformer, args, kwargs)
        hs = a["hidden_states"]  # (B, C, H, W) latent, pre-patch
        if hs.dim() != 4:
            raise ValueError(
                f"SD3Transformer2DModel expects a 4-D latent (B, C, H, W), got {tuple(hs.shape)}"
            )
        p = int(transformer.config.patch_size)
        # PatchEmbed (a stride-p convolution) keeps floor(H / p) x floor(W / p) tokens
        grid = (1, int(hs.shape[-2]) // p, int(hs.shape[-1]) // p)
        ehs = a.get("encoder_hidden_states")
        num_text = int(ehs.shape[1]) if ehs is not None else 0  # context_embedder keeps the sequence length
        return ForwardInputs(
            timestep=a.get("timestep"),
            grid=grid,
            num_text=num_text,
            text_first=False,
            text_valid=None,  # SD3 has no text attention mask: every text token is attended
            batch_size=int(hs.shape[0]),
        )

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
    ) -> Any:
        if "temb" in extra:
            # only the IP-Adapter path passes `temb` (with ip_hidden_states) to the attention modules
            raise RuntimeError(
                "dit-sparse does not support SD3 IP-Adapter attention (IPAdapterJointAttnProcessor2_0) yet; "
                "unload the IP-Adapter or run without dit-sparse"
            )

        # --- diffusers 0.42.1 JointAttnProcessor2_0.__call__, line for line (attention_mask is ignored there too)
        residual = hidden_states

        batch_size = hidden_states.shape[0]

        # `sample` projections.
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

        # `context` projections.
        if encoder_hidden_states is not None:
            encoder_hidden_states_query_proj = attn.add_q_proj(encoder_hidden_states)
            encoder_hidden_states_key_proj = attn.add_k_proj(encoder_hidden_states)
            encoder_hidden_states_value_proj = attn.add_v_proj(encoder_hidden_states)

            encoder_hidden_states_query_proj = encoder_hidden_states_query_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_key_proj = encoder_hidden_states_key_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_value_proj = encoder_hidden_states_value_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)

            if attn.norm_added_q is not None:
                encoder_hidden_states_query_proj = attn.norm_added_q(encoder_hidden_states_query_proj)
            if attn.norm_added_k is not None:
                encoder_hidden_states_key_proj = attn.norm_added_k(encoder_hidden_states_key_proj)

            # joint sequence: [image, text] (text LAST)
            query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)
            key = torch.cat([key, encoder_hidden_states_key_proj], dim=2)
            value = torch.cat([value, encoder_hidden_states_value_proj], dim=2)

        def dense() -> torch.Tensor:
            return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)

        # SD3.5's image-only attn2 (no encoder_hidden_states) has no text tokens in its sequence
        num_text = 0 if encoder_hidden_states is None else None
        hidden_states = core(query, key, value, dense, layout="bhsd", num_text=num_text)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            # Split the attention outputs.
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


FAMILY = SD3Family()
