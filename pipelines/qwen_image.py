"""Qwen-Image (``QwenImageTransformer2DModel``): dual-stream joint self-attention, text FIRST, with text padding.

Every block's ``transformer_blocks.*.attn`` projects the image and text streams separately, applies RoPE to each
(``apply_rotary_emb_qwen``, complex form) and attends over ``[text, image]``. Text length varies per prompt and is
padded; the model builds its key-padding mask from ``encoder_hidden_states_mask`` (``(B, L)``, 1 = real token), and
dit-sparse passes the same mask to the core as ``text_valid`` so padded text keys are dropped in sparse layers too.
(Pipelines pass ``None`` when no token is padded.)

The image is packed by the pipeline (2×2 latent patches); the grid comes from the transformer's own ``img_shapes``
input (per sample a list of ``(F, H', W')``, read the way the model's ``QwenEmbedRope`` reads it: the first
sample's). Edit / Layered pipelines append further images (reference, layers) to the image tokens: when all have the
same ``H' × W'`` they are stacked as frames, ``(ΣF, H', W')``; images of different sizes cannot be laid out as one
grid and are refused with a clear error. The transformer receives ``timestep = t / 1000``; :meth:`read_inputs`
reports it in scheduler units (× 1000) like the other families.

The processor mirrors diffusers' ``QwenDoubleStreamAttnProcessor2_0`` (0.42) line for line; only the
``dispatch_attention_fn`` call is replaced by the sparse core.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Core, ForwardInputs, ModelFamily, project_heads


def grid_from_img_shapes(img_shapes: Any) -> tuple[int, int, int]:
    """``(F', H', W')`` from Qwen's ``img_shapes`` (``[[(F, H', W'), ...], ...]`` per sample, or a flat form)."""
    if img_shapes is None:
        raise ValueError("dit-sparse (qwen_image): the transformer was called without img_shapes")
    # exactly how QwenEmbedRope.forward reads it: the first sample's list of (frame, height, width)
    shapes = img_shapes
    if isinstance(shapes, list):
        shapes = shapes[0]
    if not isinstance(shapes, list):
        shapes = [shapes]
    dims = [tuple(int(x) for x in fhw) for fhw in shapes]
    if any(len(d) != 3 for d in dims):
        raise ValueError(
            f"dit-sparse (qwen_image): img_shapes entries must be (frames, height, width), got {dims}"
        )
    if len({d[1:] for d in dims}) != 1:
        raise ValueError(
            f"dit-sparse (qwen_image): the image tokens hold images of different sizes {dims} (e.g. an edit reference "
            "image of another resolution); sparse layouts need one grid: give the images the output size"
        )
    return (sum(d[0] for d in dims), dims[0][1], dims[0][2])


class QwenImageFamily(ModelFamily):
    name = "qwen_image"
    class_names = ("QwenImageTransformer2DModel",)
    text_position = "first"
    self_attention_paths = ("transformer_blocks.*.attn",)
    description = "Qwen-Image text-to-image / edit (dual-stream joint attention, padded text first)"

    def dense_processor(self, module: torch.nn.Module) -> Any:
        # the blocks use the legacy ``Attention`` class, which has no ``_default_processor_cls``
        from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

        return QwenDoubleStreamAttnProcessor2_0()

    def read_inputs(self, transformer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardInputs:
        a = self.bind_arguments(transformer, args, kwargs)
        hs = a["hidden_states"]  # (B, S_img, C) packed latents
        ehs = a.get("encoder_hidden_states")
        if ehs is None:
            raise ValueError(
                "dit-sparse (qwen_image): the transformer was called without encoder_hidden_states"
            )
        mask = a.get("encoder_hidden_states_mask")
        text_valid = None
        if mask is not None:
            mask = mask.to(torch.bool)
            if not bool(mask.all()):  # one host sync per forward
                text_valid = mask
        t = a.get("timestep")
        if isinstance(t, torch.Tensor):
            t = t.detach().float() * 1000  # the pipeline passes t / 1000; report scheduler units
        elif t is not None:
            t = float(t) * 1000
        return ForwardInputs(
            timestep=t,
            grid=grid_from_img_shapes(a.get("img_shapes")),
            num_text=int(ehs.shape[1]),
            text_first=True,
            text_valid=text_valid,
            batch_size=int(hs.shape[0]),
        )

    def attention(
        self,
        proc: Any,
        core: Core,
        attn: Any,  # diffusers Attention (legacy class)
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rotary_emb: Any,
        **extra: Any,
    ) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        encoder_hidden_states_mask: torch.Tensor | None = extra.get("encoder_hidden_states_mask")
        image_rotary_emb = rotary_emb
        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states (text stream)")

        if attention_mask is not None:
            raise ValueError(
                "QwenDoubleStreamAttnProcessor2_0 does not accept an external attention_mask. "
                "Pass encoder_hidden_states_mask to let the processor build the joint mask."
            )

        text_valid = None
        if encoder_hidden_states_mask is not None:
            seq_img = hidden_states.shape[1]
            image_mask = torch.ones(
                (hidden_states.shape[0], seq_img), dtype=torch.bool, device=hidden_states.device
            )
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)
            attention_mask = attention_mask[:, None, None, :]
            text_valid = encoder_hidden_states_mask.to(torch.bool)  # (B, L) True = real token

        seq_txt = encoder_hidden_states.shape[1]

        # QKV of the image stream (sample projections) and the text stream (context projections), qk-normed
        img_query, img_key, img_value = project_heads(attn, hidden_states)
        txt_query, txt_key, txt_value = project_heads(attn, encoder_hidden_states, added=True)

        # Apply RoPE
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)

        # Concatenate for joint attention. Order: [text, image]
        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)

        def dense() -> torch.Tensor:
            return dispatch_attention_fn(
                joint_query,
                joint_key,
                joint_value,
                attn_mask=attention_mask,
                dropout_p=0.0,
                is_causal=False,
                backend=proc._attention_backend,
                parallel_config=proc._parallel_config,
            )

        joint_hidden_states = core(
            joint_query, joint_key, joint_value, dense, layout="bshd", text_valid=text_valid
        )

        # Reshape back
        joint_hidden_states = joint_hidden_states.flatten(2, 3)
        joint_hidden_states = joint_hidden_states.to(joint_query.dtype)

        # Split attention outputs back
        txt_attn_output = joint_hidden_states[:, :seq_txt, :]  # Text part
        img_attn_output = joint_hidden_states[:, seq_txt:, :]  # Image part

        # Apply output projections
        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)  # dropout

        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())

        return img_attn_output, txt_attn_output


FAMILY = QwenImageFamily()
