"""FLUX.1 (``FluxTransformer2DModel``): joint self-attention, text FIRST, in dual and single-stream blocks.

Profile order: the dual-stream blocks ``transformer_blocks.*.attn`` (image and text streams projected separately,
concatenated ``[text, image]`` inside the processor), then the single-stream blocks
``single_transformer_blocks.*.attn``, which get the already concatenated ``[text, image]`` sequence with
``encoder_hidden_states=None``. Either way the attention sequence is ``[text (T5, 512 by default), image]``.

The image is packed by the pipeline (2×2 latent patches → ``(B, H'·W', 64)``), so the grid is read from the
transformer's own ``img_ids`` (``(S, 3)``: frame, row, col, raster order). FLUX.1 Kontext appends a reference image
with frame id 1: when it has the target's size the grid is ``(2, H', W')``; images of different sizes cannot be laid
out as one grid and are refused with a clear error. The transformer receives ``timestep = t / 1000`` (it multiplies
back by 1000 inside); :meth:`FluxFamily.read_inputs` reports it in scheduler units (× 1000) like the other families.
FLUX has no text padding mask (padded T5 tokens are attended to by the model itself), so ``text_valid`` is None.

The processor mirrors diffusers' ``FluxAttnProcessor`` (0.42) line for line, with the model's own projection helper
and ``apply_rotary_emb``; only the ``dispatch_attention_fn`` call is replaced by the sparse core. Not supported (a
clear error, never a silent change): an ``attention_mask`` passed through ``joint_attention_kwargs`` (no FLUX
pipeline passes one), and IP-Adapter (its ``FluxIPAdapterAttnProcessor`` would be replaced).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Core, ForwardInputs, ModelFamily


def grid_from_img_ids(img_ids: torch.Tensor, num_tokens: int) -> tuple[int, int, int]:
    """``(F', H', W')`` of FLUX's packed image tokens from ``img_ids`` (``(S, 3)``: frame, row, col).

    Every image (a run of equal frame ids: the target, then e.g. a Kontext reference image) must be a full raster of
    the same ``H' × W'``, in row-major order; anything else raises ``ValueError`` (there is no single grid for it).
    One small device-to-host copy per transformer forward (not per layer).
    """
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # 3-D ids are deprecated; the model takes [0] too
    if ids.ndim != 2 or ids.shape[-1] < 3:
        raise ValueError(f"dit-sparse (flux): img_ids must be (S, 3), got shape {tuple(img_ids.shape)}")
    if ids.shape[0] != num_tokens:
        raise ValueError(
            f"dit-sparse (flux): img_ids has {ids.shape[0]} rows but hidden_states has {num_tokens} image tokens"
        )
    cpu = ids.detach().to("cpu")
    exact = cpu.double()
    _, counts = torch.unique_consecutive(exact[:, 0], return_counts=True)
    shapes: list[tuple[int, int]] = []
    start = 0
    for c in (int(x) for x in counts):
        seg = exact[start : start + c]
        rows, cols = seg[:, 1], seg[:, 2]
        off_first_row = (rows != rows[0]).nonzero()
        w = int(off_first_row[0, 0]) if off_first_row.numel() else c
        h = c // w
        idx = torch.arange(c, dtype=torch.float64)
        # the ids the pipeline would have built for an h × w raster, rounded through the ids' own dtype
        want_rows = (rows[0] + torch.div(idx, w, rounding_mode="floor")).to(cpu.dtype).double()
        want_cols = (cols[0] + idx % w).to(cpu.dtype).double()
        if h * w != c or not (torch.equal(rows, want_rows) and torch.equal(cols, want_cols)):
            raise ValueError(
                "dit-sparse (flux): the image tokens' img_ids are not a row-major raster; dit-sparse cannot lay "
                "this input out as a latent grid"
            )
        shapes.append((h, w))
        start += c
    if len(set(shapes)) != 1:
        raise ValueError(
            f"dit-sparse (flux): the image tokens hold images of different sizes {shapes} (e.g. a Kontext reference "
            "image of another resolution); sparse layouts need one grid: give the reference image the output size"
        )
    h, w = shapes[0]
    return (len(shapes), h, w)


class FluxFamily(ModelFamily):
    name = "flux"
    class_names = ("FluxTransformer2DModel",)
    text_position = "first"
    self_attention_paths = ("transformer_blocks.*.attn", "single_transformer_blocks.*.attn")
    description = "FLUX.1 text-to-image (dual- then single-stream joint attention, text first)"

    def read_inputs(self, transformer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardInputs:
        a = self.bind_arguments(transformer, args, kwargs)
        hs = a["hidden_states"]  # (B, S_img, C) packed latents
        ehs = a.get("encoder_hidden_states")
        img_ids = a.get("img_ids")
        if img_ids is None or ehs is None:
            raise ValueError(
                "dit-sparse (flux): the transformer was called without img_ids or encoder_hidden_states"
            )
        if "ip_adapter_image_embeds" in (a.get("joint_attention_kwargs") or {}):
            # apply() replaced FluxIPAdapterAttnProcessor, whose image cross-attention would silently be lost
            raise NotImplementedError(
                "dit-sparse (flux): IP-Adapter is not supported; unload it before apply()"
            )
        t = a.get("timestep")
        if isinstance(t, torch.Tensor):
            t = t.detach().float() * 1000  # the pipeline passes t / 1000; report scheduler units
        elif t is not None:
            t = float(t) * 1000
        return ForwardInputs(
            timestep=t,
            grid=grid_from_img_ids(img_ids, int(hs.shape[1])),
            num_text=int(ehs.shape[1]),
            text_first=True,
            text_valid=None,  # FLUX attends to every T5 token, padding included
            batch_size=int(hs.shape[0]),
        )

    def attention(
        self,
        proc: Any,
        core: Core,
        attn: Any,  # FluxAttention
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rotary_emb: Any,
        **extra: Any,
    ) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections, apply_rotary_emb

        if attention_mask is not None:
            # no FLUX pipeline passes one; an arbitrary mask cannot be honoured by the block-sparse kernel
            raise NotImplementedError(
                "dit-sparse (flux): an attention_mask in joint_attention_kwargs is not supported on sparsified "
                "layers; remove it or run without dit-sparse"
            )
        image_rotary_emb = rotary_emb
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            # [text, image]
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        def dense() -> torch.Tensor:
            return dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=proc._attention_backend,
                parallel_config=proc._parallel_config,
            )

        hidden_states = core(query, key, value, dense, layout="bshd")
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]],
                dim=1,
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


FAMILY = FluxFamily()
