"""torch.compile over a transformer running sparse: the processor, the plan caches, draft's dynamic masks and the
kernel (a custom op) trace into one graph with no graph break once the layer plans exist, and the compiled
transformer gives what the eager one gives. (GPU speed under compile: ``dit-sparse bench e2e --compile``.)"""

from __future__ import annotations

import pytest
import torch
from tiny_wan import tiny_wan_transformer

import dit_sparse
from dit_sparse import Profile
from dit_sparse.kernels import triton_interpreting

WINDOW = ("window", {"f": 1, "h": 1, "w": 1})
REORDER = ("reorder_window", {"order": "HWF", "blocks": 0})  # a token permutation
DRAFT = ("draft", {"budget": 0.4, "patch": [2, 4]})  # dynamic: masks from q/k at every step, permuted
TRITON = torch.cuda.is_available() or triton_interpreting()
CASES = [(*WINDOW, "gather"), (*REORDER, "gather"), (*DRAFT, "gather")]
if TRITON:
    CASES += [(*REORDER, "triton"), (*DRAFT, "triton")]


def _inputs(t: int) -> dict:
    g = torch.Generator().manual_seed(t)
    return {
        "hidden_states": torch.randn(
            1, 16, 3, 8, 10, generator=g
        ),  # grid (3, 4, 5): 60 tokens, 4 blocks of 16
        "timestep": torch.tensor([t]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
    }


@pytest.mark.parametrize(("pattern", "params", "impl"), CASES, ids=[f"{p}-{i}" for p, _, i in CASES])
def test_sparse_transformer_compiles_without_graph_breaks(pattern, params, impl) -> None:
    torch._dynamo.reset()
    tr = tiny_wan_transformer(num_layers=2).eval()
    prof = Profile.uniform(tr, pattern, params, block_size=16)
    with dit_sparse.apply(tr, prof, impl=impl) as handle, torch.no_grad():
        tr(**_inputs(900))  # step 0 (eager): builds the layer plans
        explained = torch._dynamo.explain(tr)(**_inputs(800))  # step 1, traced
        assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
        assert explained.graph_count == 1
        eager = tr(**_inputs(700)).sample  # step 2
        compiled = torch.compile(tr, backend="aot_eager")
        torch._dynamo.reset()
        handle.bindings[0].reset()  # run the same steps again, now compiled
        for t in (900, 800):
            compiled(**_inputs(t))
        got = compiled(**_inputs(700)).sample
        rep = handle.report()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    assert rep.density and all(0 < d < 1 for d in rep.density.values())  # really sparse, also when compiled
