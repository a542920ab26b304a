"""LTX-Video (``LTXVideoTransformer3DModel``, 0.9.x): video-only self-attention in ``transformer_blocks.*.attn1``.

Text enters through cross-attention (``attn2``, left to the stock processor), so self-attention is all video, packed
``(B, S, C)`` in raster frame-major order. The transformer never sees a 5-D latent: the token grid is what its own
RoPE uses, i.e.

* the ``num_frames`` / ``height`` / ``width`` forward kwargs (``LTXPipeline``, ``LTXImageToVideoPipeline``: the
  latent sizes; real checkpoints have patch size 1, so these are the token grid; should they be the pre-patch sizes
  of a model with ``patch_size > 1``, the patched grid is used when it matches the token count), or
* ``video_coords`` ``(B, 3, S)`` when given (``LTXConditionPipeline``, the long multi-prompt pipeline), which take
  precedence in the model's RoPE too. The grid is recovered from the memory order of the spatial coordinates
  (raster rows of ``W`` tokens, frames of ``H·W`` tokens); conditioning tokens that the condition pipeline prepends
  are whole extra frames of the same spatial size and simply count as frames. Frame coordinates are not used (the
  long pipeline rewrites them for overlap / guiding frames; the memory layout stays a raster grid).

The processor mirrors diffusers' ``LTXVideoAttnProcessor`` (0.42): q/k/v projections, RMS qk-norm across heads,
RoPE applied on ``(B, S, inner)`` *before* the head unflatten (``transformer_ltx.apply_rotary_emb``), and
``dispatch_attention_fn`` with the processor's backend, which is what ``dense_fn`` does.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Core, ForwardInputs, ModelFamily


def grid_from_video_coords(video_coords: torch.Tensor) -> tuple[int, int, int]:
    """``(F, H, W)`` token grid from LTX ``video_coords`` ``(B, 3, S)`` (rows ``t, y, x``), by memory order.

    Within a frame the spatial positions are distinct and raster (``x`` fastest); every frame repeats the first
    frame's spatial positions. Raises ``ValueError`` when the coordinates are not such a grid.
    """
    if video_coords.dim() != 3 or video_coords.shape[1] != 3:
        raise ValueError(f"LTX video_coords must be (B, 3, S), got shape {tuple(video_coords.shape)}")
    yx = video_coords[0, 1:3].detach()
    s = int(yx.shape[1])

    def first_repeat(
        rows: torch.Tensor,
    ) -> int:  # first i > 0 where rows[:, i] == rows[:, 0], else its length
        same = (rows[:, 1:] == rows[:, :1]).all(dim=0).nonzero()
        return int(same[0, 0]) + 1 if same.numel() else int(rows.shape[1])

    hw = first_repeat(yx)  # tokens per frame: the first token's (y, x) comes back
    w = first_repeat(yx[1:2, :hw])  # tokens per row: the first token's x comes back
    if s % hw or hw % w:
        raise ValueError(_not_a_grid(s, hw, w))
    f, h = s // hw, hw // w
    frames = yx.reshape(2, f, h, w)
    ok = bool((frames == frames[:, :1]).all())  # every frame has the first frame's spatial positions
    ok = ok and bool((frames[0, 0] == frames[0, 0, :, :1]).all())  # y constant along a row
    ok = ok and bool((frames[1, 0] == frames[1, 0, :1, :]).all())  # x constant down a column
    ok = ok and frames[0, 0, :, 0].unique().numel() == h and frames[1, 0, 0, :].unique().numel() == w
    if not ok:
        raise ValueError(_not_a_grid(s, hw, w))
    return (f, h, w)


def _not_a_grid(s: int, hw: int, w: int) -> str:
    return (
        f"dit-sparse (ltx): video_coords of {s} tokens are not a raster (frames, height, width) grid (found "
        f"{hw} tokens per frame, {w} per row); this token layout is not supported"
    )


class LTXVideoFamily(ModelFamily):
    name = "ltx"
    class_names = ("LTXVideoTransformer3DModel",)
    text_position = "none"
    self_attention_paths = ("transformer_blocks.*.attn1",)
    description = "LTX-Video 0.9.x text/image-to-video (video-only self-attention)"

    def patch_size(self, transformer: Any) -> list[int]:
        cfg = transformer.config
        p = int(cfg.patch_size)
        return [int(cfg.patch_size_t), p, p]

    def read_inputs(self, transformer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardInputs:
        a = self.bind_arguments(transformer, args, kwargs)
        hs = a["hidden_states"]
        coords = a.get("video_coords")
        if coords is not None:  # takes precedence over num_frames/height/width, as in the model's RoPE
            grid = grid_from_video_coords(coords)
        else:
            nf, h, w = a.get("num_frames"), a.get("height"), a.get("width")
            if nf is None or h is None or w is None:
                raise ValueError(
                    "dit-sparse (ltx): the transformer was called without num_frames/height/width or video_coords, "
                    "so the latent grid is unknown"
                )
            grid = (int(nf), int(h), int(w))
            pt, p, _ = self.patch_size(transformer)
            patched = (grid[0] // pt, grid[1] // p, grid[2] // p)
            seq = int(hs.shape[1])
            if grid[0] * grid[1] * grid[2] != seq and patched[0] * patched[1] * patched[2] == seq:
                grid = patched  # pre-patch latent sizes of a model with patch_size > 1
        return ForwardInputs(timestep=a.get("timestep"), grid=grid, batch_size=int(hs.shape[0]))

    def attention(
        self,
        proc: Any,
        core: Core,
        attn: Any,  # diffusers.models.transformers.transformer_ltx.LTXAttention
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rotary_emb: Any,
        **extra: Any,
    ) -> torch.Tensor:
        # mirrors diffusers 0.42.1 LTXVideoAttnProcessor.__call__; only dispatch_attention_fn goes through core
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        if encoder_hidden_states is not None:
            raise RuntimeError(
                "dit-sparse's LTX processor only handles self-attention (transformer_blocks.*.attn1)"
            )
        image_rotary_emb = rotary_emb
        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        encoder_hidden_states = hidden_states

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

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

        reason = None
        if attention_mask is not None:
            # no diffusers pipeline passes one; an arbitrary mask cannot be honoured by a block mask
            reason = "LTX self-attention got an attention_mask, which the sparse kernel cannot apply"
        hidden_states = core(query, key, value, dense, layout="bshd", dense_reason=reason)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


FAMILY = LTXVideoFamily()
