"""benchmarks/tiny_attention_mass.py: the text / near / far shares against a per-token brute force, and one run of
the script on the bundled model at a small canvas."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dit_sparse.benchmarks import tiny_attention_mass as tam
from dit_sparse.patterns import MaskLayout


@pytest.mark.parametrize("text_first", [True, False])
def test_shares_match_a_per_token_brute_force(text_first):
    torch.manual_seed(0)
    layout = MaskLayout((3, 4, 5), 7, text_first=text_first)  # 60 video + 7 text tokens
    n = layout.seq_len
    q, k = torch.randn(2, 3, n, 16), torch.randn(2, 3, n, 16)
    k[:, 1, :7] += 2.0 * q[:, 1].mean(1, keepdim=True)  # head 1 leans on some tokens, whatever they are
    rows = torch.tensor([0, 17, 33, 59])
    window = (1, 1, 2)
    got = tam.attention_shares(q, k, layout, window, rows)

    offset = 7 if text_first else 0
    text_idx = list(range(0, 7)) if text_first else list(range(60, 67))
    want = torch.zeros(3, 3, dtype=torch.float64)
    for b in range(2):
        for h in range(3):
            for r in rows.tolist():
                i = offset + r
                f, y, x = r // 20, (r % 20) // 5, r % 5
                logits = [float(q[b, h, i].double() @ k[b, h, j].double()) / 4.0 for j in range(n)]
                m = max(logits)
                w = [math.exp(v - m) for v in logits]
                z = sum(w)
                text = sum(w[j] for j in text_idx) / z
                near = 0.0
                for t in range(60):
                    tf, ty, tx = t // 20, (t % 20) // 5, t % 5
                    if abs(tf - f) <= 1 and abs(ty - y) <= 1 and abs(tx - x) <= 2:
                        near += w[offset + t] / z
                want[:, h] += torch.tensor([text, near, 1 - text - near], dtype=torch.float64)
    want /= 2 * len(rows)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_script_on_the_bundled_model_writes_its_json_once(tmp_path, capsys):
    out = tmp_path / "mass.json"
    argv = ["--height", "48", "--width", "48", "--frames", "9", "--steps", "2", "--guidance", "1"]
    assert tam.main([*argv, "--queries", "16", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["settings"]["sample_steps"] == [0, 1]
    assert [(r["layer"], r["step"]) for r in d["rows"]] == [(li, s) for li in range(4) for s in (0, 1)]
    for r in d["rows"]:
        for h in range(2):
            shares = [r[name][h] for name in tam.NAMES]
            assert all(-1e-9 <= s <= 1 + 1e-9 for s in shares) and math.isclose(sum(shares), 1.0)
    assert "| layer | step |" in capsys.readouterr().out
    assert tam.main([*argv, "--out", str(out)]) == 2  # never replaced
