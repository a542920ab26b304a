"""What dit-sparse must know about one diffusers model family, as data plus a few small methods.

Adding a family = one file in ``pipelines/`` defining a :class:`ModelFamily` subclass instance named ``FAMILY``,
listed in ``pipelines/__init__.py::_FAMILY_MODULES``, plus a tiny-model test. A family knows:

* which modules are the self-attention layers to sparsify (and their order = the profile's layer index);
* where text sits in joint self-attention (``none`` / ``first`` / ``last``) and which text tokens are padding;
* how to read the latent grid and timestep from the transformer's own forward inputs;
* how its attention processor computes q/k/v (the model's own projections, qk-norm and RoPE, called as-is), so
  that only the core attention call is replaced by ``core(q, k, v, dense_fn)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dit_sparse.profile import Fingerprint


@dataclass(frozen=True)
class ForwardInputs:
    """What the root hook learns from one transformer forward call."""

    timestep: torch.Tensor | float | None
    grid: tuple[int, int, int]  # (F', H', W') after patching; images: F' = 1
    num_text: int = 0  # text tokens inside self-attention
    text_first: bool = False
    text_valid: torch.Tensor | None = None  # (B, num_text) bool, True = real token; None = no padding
    batch_size: int = 1


class Core:
    """The replaced core attention for one call, handed to :meth:`ModelFamily.attention`.

    ``core(q, k, v, dense_fn, layout="bshd", scale=None, text_valid=None, dense_reason=None)`` returns attention
    output in the layout it was given. ``dense_fn()`` must compute exactly what the model's own processor computes
    (its backend, its mask): it runs whenever this layer is dense at this step, so dense is bit-identical to no
    plugin. A family that cannot run a call sparse (e.g. an arbitrary attention mask) passes ``dense_reason``: the
    call runs ``dense_fn()``, the reason is warned once and listed in the run report (never a silent fallback).
    ``num_text`` overrides the forward's text count for one call (e.g. SD3.5's image-only ``attn2`` layers: 0).
    """

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dense_fn: Callable[[], torch.Tensor],
        *,
        layout: str = "bshd",
        scale: float | None = None,
        text_valid: torch.Tensor | None = None,
        dense_reason: str | None = None,
        num_text: int | None = None,
    ) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class ModelFamily:
    """Base class; subclasses fill in the class attributes and override the methods that differ."""

    name: ClassVar[str] = ""
    class_names: ClassVar[tuple[str, ...]] = ()  # transformer classes (diffusers class names)
    text_position: ClassVar[str] = "none"  # "none" | "first" | "last"
    self_attention_paths: ClassVar[tuple[str, ...]] = ()  # module-path patterns, e.g. ("blocks.*.attn1",)
    description: ClassVar[str] = ""

    # ------------------------------------------------------------------------------------------------ modules
    def matches(self, transformer: Any) -> bool:
        return type(transformer).__name__ in self.class_names

    def self_attention_modules(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """``(path, module)`` of every self-attention layer, in profile order (path patterns in order given)."""
        import fnmatch

        found: list[tuple[str, torch.nn.Module]] = []
        named = list(transformer.named_modules())
        for pattern in self.self_attention_paths:
            found.extend(
                (n, m)
                for n, m in named
                if fnmatch.fnmatchcase(n, pattern) and n.count(".") == pattern.count(".")
            )
        return found

    def num_heads(self, transformer: Any) -> int:
        return int(transformer.config.num_attention_heads)

    def head_dim(self, transformer: Any) -> int:
        return int(transformer.config.attention_head_dim)

    def patch_size(self, transformer: Any) -> list[int]:
        p = getattr(transformer.config, "patch_size", None)
        if p is None:
            return []
        return [int(x) for x in p] if isinstance(p, list | tuple) else [int(p)]

    def fingerprint(self, transformer: Any) -> Fingerprint:
        return Fingerprint(
            transformer_class=type(transformer).__name__,
            num_layers=len(self.self_attention_modules(transformer)),
            num_heads=self.num_heads(transformer),
            head_dim=self.head_dim(transformer),
            patch_size=self.patch_size(transformer),
        )

    def dense_processor(self, module: torch.nn.Module) -> Any:
        """A stock processor for a module this plugin does not sparsify (used by the one-liner)."""
        cls = getattr(type(module), "_default_processor_cls", None)
        if cls is None:
            raise TypeError(f"{self.name}: no default processor known for {type(module).__name__}")
        return cls()

    # ------------------------------------------------------------------------------------------------ inputs
    def bind_arguments(
        self, transformer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """Map positional and keyword forward arguments to names (like diffusers' ModuleForwardMetadata)."""
        sig = inspect.signature(type(transformer).forward)
        params = list(sig.parameters)[1:]  # drop self
        bound = dict(zip(params, args))
        bound.update(kwargs)
        return bound

    def read_inputs(self, transformer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardInputs:
        raise NotImplementedError

    @property
    def resets_each_run(self) -> bool:
        """True when the pipeline resets stateful hooks after each call (transformer has CacheMixin)."""
        return True

    # ------------------------------------------------------------------------------------------------ attention
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
    ) -> Any:
        """Run the model's own processor logic with ``core`` as the attention call. ``proc`` carries
        ``_attention_backend`` and ``_parallel_config`` (copied from the processor it replaced)."""
        raise NotImplementedError


def latent_grid(hidden_states: torch.Tensor, patch: list[int], layout: str = "bcfhw") -> tuple[int, int, int]:
    """Grid after patching for a 5-D video latent. ``layout`` is ``bcfhw`` (Wan, Hunyuan, Mochi) or ``bfchw``."""
    if hidden_states.dim() != 5:
        raise ValueError(f"expected a 5-D video latent, got shape {tuple(hidden_states.shape)}")
    if layout == "bcfhw":
        f, h, w = hidden_states.shape[2], hidden_states.shape[3], hidden_states.shape[4]
    else:
        f, h, w = hidden_states.shape[1], hidden_states.shape[3], hidden_states.shape[4]
    if len(patch) == 3:
        pt, ph, pw = patch
    elif patch:
        pt, ph, pw = 1, patch[0], patch[0]
    else:
        pt, ph, pw = 1, 1, 1
    return (-(-f // pt), -(-h // ph), -(-w // pw))


def project_heads(
    attn: Any, x: torch.Tensor, added: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, S, H, D)`` query, key and value of ``x (B, S, C)`` as diffusers' joint-attention processors make them:
    the module's ``to_q/to_k/to_v`` (``added``: the text stream's ``add_q_proj/add_k_proj/add_v_proj``), split into
    ``attn.heads`` heads, then the per-head qk-norm ``norm_q/norm_k`` (``norm_added_q/norm_added_k``) where the
    module has one."""
    if added:
        projs, norms = (
            (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
            (attn.norm_added_q, attn.norm_added_k),
        )
    else:
        projs, norms = (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
    query, key, value = (proj(x).unflatten(2, (attn.heads, -1)) for proj in projs)
    if norms[0] is not None:
        query = norms[0](query)
    if norms[1] is not None:
        key = norms[1](key)
    return query, key, value
