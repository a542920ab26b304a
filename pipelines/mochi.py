"""Mochi (``MochiTransformer3DModel``): joint video + text self-attention in ``transformer_blocks.*.attn1``, text LAST.

The video tokens come from a per-frame 2-D patch embed (frames are not patched), raster frame-major; the grid is read
from ``hidden_states`` ``(B, C, F, H, W)`` as ``(F, H // p, W // p)``, the model's own arithmetic. Text comes from
``encoder_hidden_states`` ``(B, L, ·)`` with ``encoder_attention_mask`` ``(B, L)``.

diffusers' ``MochiAttnProcessor2_0`` (0.42.1) runs a per-sample loop: it keeps only the valid text tokens of each
sample (``nonzero(mask)``), attends over ``[video, valid text]`` with ``F.scaled_dot_product_attention`` and zero-pads
the output at the END (so the valid text outputs move to the first text rows and the last rows are zero). This
processor mirrors it line for line (projections, qk-norm, the nested RoPE helper) and gives the core the full
``[video, text]`` sequence with ``text_valid`` = the mask: the core drops the padded text keys per sample exactly like
the model does. ``dense_fn`` runs the stock loop and writes each sample's output back to its tokens' own rows (zeros on
padded text rows), so it has the layout of ``q``; the result of the core is then packed the way the stock processor
packs it. A dense profile is therefore bit-identical to no plugin.

``MochiAttention`` is not an ``AttentionModuleMixin`` and has no ``set_processor`` (only a ``processor`` attribute):
the core swaps processors with ``dit_sparse.integration.set_module_processor``, which handles that.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Core, ForwardInputs, ModelFamily, project_heads


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # exactly the helper nested in diffusers' MochiAttnProcessor2_0.__call__
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()

    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)

    return torch.stack([cos, sin], dim=-1).flatten(-2)


class MochiFamily(ModelFamily):
    name = "mochi"
    class_names = ("MochiTransformer3DModel",)
    text_position = "last"
    self_attention_paths = ("transformer_blocks.*.attn1",)
    description = "Mochi 1 text-to-video (joint attention, text last)"

    def read_inputs(self, transformer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardInputs:
        a = self.bind_arguments(transformer, args, kwargs)
        hs = a["hidden_states"]
        p = int(transformer.config.patch_size)
        grid = (int(hs.shape[2]), int(hs.shape[3]) // p, int(hs.shape[4]) // p)
        text = a["encoder_hidden_states"]
        mask = a.get("encoder_attention_mask")
        text_valid = None
        if mask is not None:
            valid = mask != 0  # the processor keeps nonzero(mask)
            text_valid = None if bool(valid.all()) else valid
        return ForwardInputs(
            timestep=a.get("timestep"),
            grid=grid,
            num_text=int(text.shape[1]),
            text_first=False,
            text_valid=text_valid,
            batch_size=int(hs.shape[0]),
        )

    def dense_processor(self, module: torch.nn.Module) -> Any:
        from diffusers.models.attention_processor import MochiAttnProcessor2_0

        return MochiAttnProcessor2_0()

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.nn.functional as F

        if encoder_hidden_states is None or attention_mask is None:
            raise RuntimeError(
                "Mochi attention needs encoder_hidden_states and the text attention_mask (B, L)"
            )
        image_rotary_emb = rotary_emb

        query, key, value = project_heads(attn, hidden_states)
        encoder_query, encoder_key, encoder_value = project_heads(attn, encoder_hidden_states, added=True)

        if image_rotary_emb is not None:
            query = _apply_rotary_emb(query, *image_rotary_emb)
            key = _apply_rotary_emb(key, *image_rotary_emb)

        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        encoder_query, encoder_key, encoder_value = (
            encoder_query.transpose(1, 2),
            encoder_key.transpose(1, 2),
            encoder_value.transpose(1, 2),
        )

        sequence_length = query.size(2)
        encoder_sequence_length = encoder_query.size(2)
        total_length = sequence_length + encoder_sequence_length

        batch_size, heads, _, dim = query.shape
        # per sample: the valid text tokens, and the rows of [video, text] the stock processor keeps, in its order
        valid_indices = []
        kept_rows = []
        for idx in range(batch_size):
            mask = attention_mask[idx][None, :]
            valid_prompt_token_indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
            valid_indices.append(valid_prompt_token_indices)
            video_rows = torch.arange(sequence_length, device=query.device)
            kept_rows.append(torch.cat([video_rows, sequence_length + valid_prompt_token_indices]))

        def dense() -> torch.Tensor:
            # the stock per-sample loop; each sample's output goes back to its own rows (padded text rows stay 0)
            out = query.new_zeros(batch_size, heads, total_length, dim)
            for idx in range(batch_size):
                valid_prompt_token_indices = valid_indices[idx]

                valid_encoder_query = encoder_query[idx : idx + 1, :, valid_prompt_token_indices, :]
                valid_encoder_key = encoder_key[idx : idx + 1, :, valid_prompt_token_indices, :]
                valid_encoder_value = encoder_value[idx : idx + 1, :, valid_prompt_token_indices, :]

                valid_query = torch.cat([query[idx : idx + 1], valid_encoder_query], dim=2)
                valid_key = torch.cat([key[idx : idx + 1], valid_encoder_key], dim=2)
                valid_value = torch.cat([value[idx : idx + 1], valid_encoder_value], dim=2)

                attn_output = F.scaled_dot_product_attention(
                    valid_query, valid_key, valid_value, dropout_p=0.0, is_causal=False
                )
                out[idx : idx + 1, :, kept_rows[idx]] = attn_output
            return out

        full_query = torch.cat([query, encoder_query], dim=2)
        full_key = torch.cat([key, encoder_key], dim=2)
        full_value = torch.cat([value, encoder_value], dim=2)
        out = core(full_query, full_key, full_value, dense, layout="bhsd", text_valid=attention_mask != 0)

        # pack as the stock processor does: [video, valid text] per sample, zero-padded at the end
        attn_outputs = []
        for idx in range(batch_size):
            attn_output = out[idx : idx + 1, :, kept_rows[idx]]
            valid_sequence_length = attn_output.size(2)
            attn_output = F.pad(attn_output, (0, 0, 0, total_length - valid_sequence_length))
            attn_outputs.append(attn_output)

        hidden_states = torch.cat(attn_outputs, dim=0)
        hidden_states = hidden_states.transpose(1, 2).flatten(2, 3)

        hidden_states, encoder_hidden_states = hidden_states.split_with_sizes(
            (sequence_length, encoder_sequence_length), dim=1
        )

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        return hidden_states, encoder_hidden_states


FAMILY = MochiFamily()
