"""The training script of the bundled tiny text-to-video model: stock diffusers components saved as one
``from_pretrained`` folder, reproducible from its seed, continued from its checkpoints without changing the weights, never clobbering.

(The shipped weights and their ≥ 80 % detector test: ``test_tiny_trained.py``.)"""

from __future__ import annotations

import json

import pytest
import torch

from dit_sparse.pipelines import tiny
from dit_sparse.pipelines.tiny_data import VOCAB
from dit_sparse.pipelines.tiny_train import build_tokenizer, main


def test_tokenizer_knows_the_vocabulary_and_appends_eos():
    tok = build_tokenizer()
    ids = tok("A RED circle moving left").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids and len(ids) == 6
    for word in VOCAB:
        assert tok(word).input_ids[0] != tok.unk_token_id, word
    assert tok("purple").input_ids[0] == tok.unk_token_id
    padded = tok("a red circle", padding="max_length", max_length=tiny.TEXT_LENGTH, return_tensors="pt")
    assert padded.input_ids.shape == (1, tiny.TEXT_LENGTH) and int(padded.attention_mask.sum()) == 4


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "m"
    assert main(["--out", str(out), "--quick", "--seed", "3"]) == 0
    return out


def test_training_script_writes_a_loadable_pipeline(quick_model):
    from diffusers import CogVideoXPipeline

    p = CogVideoXPipeline.from_pretrained(str(quick_model), local_files_only=True)
    kwargs = tiny.prompt_kwargs(p, "a blue square moving up")  # how generate / profile / demo prompt it
    assert kwargs["max_sequence_length"] == tiny.TEXT_LENGTH and kwargs["prompt"] == "a blue square moving up"
    # 9 frames: CogVideoX's VAE decodes an odd number of latent frames (8k + 1 frames) back to the frames asked for
    video = p(**kwargs, num_frames=9, height=32, width=48, num_inference_steps=1, output_type="pt").frames
    assert video.shape == (1, 9, 3, 32, 48)
    files = [f for f in quick_model.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 30e6  # the full recipe has the same architecture
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights), weights
    summary = json.loads((quick_model / "training.json").read_text())
    assert summary["recipe"]["seed"] == 3 and (quick_model / "README.md").is_file()
    # the measured latent scale went into the VAE config the pipeline decodes with
    assert (
        p.vae.config.scaling_factor == summary["vae"]["scaling_factor"] != 1.15258426
    )  # (the class default)
    # the sample canvas and its position scales are the recipe's (48 px, 9 frames: latent 3 × 6 × 6)
    cfg = p.transformer.config
    assert (cfg.sample_height, cfg.sample_width, cfg.sample_frames) == (6, 6, 9)
    assert (cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale) == tiny.position_scales(
        48, 48, 9
    )


def test_shipped_config_normalises_the_default_canvas():
    cfg = tiny.TRANSFORMER_CONFIG
    frames, rows, cols = tiny.latent_shape(**tiny.TRAINED_CANVAS)
    assert (cfg["sample_height"], cfg["sample_width"], cfg["sample_frames"]) == (rows, cols, 33)
    assert frames * rows * cols >= 4000  # attention dominates: >= 4,000 video tokens per self-attention
    assert rows / cfg["spatial_interpolation_scale"] == tiny.SPACE_EXTENT
    assert frames / cfg["temporal_interpolation_scale"] == tiny.TIME_EXTENT
    # a small training canvas lands on the same normalised range
    small = tiny.position_scales(64, 64, 9)
    assert (8 / small[0], 3 / small[1]) == (tiny.SPACE_EXTENT, tiny.TIME_EXTENT)
    # a wide canvas keeps the rows' scale: a wider view, not a squashed one
    assert tiny.position_scales(64, 96, 9) == small


def test_stage_positions_are_normalised_to_the_stage_canvas_and_restored():
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_sincos_pos_embed

    from dit_sparse.pipelines.tiny_train import canvas_positions

    cfg = {**tiny.TRANSFORMER_CONFIG, "num_layers": 1}
    model = CogVideoXTransformer3DModel(**cfg)
    x = torch.randn(1, 3, 16, 8, 8)  # a 64-px clip of 9 frames: latent 3 × 8 × 8
    text = torch.randn(1, tiny.TEXT_LENGTH, tiny.TEXT_DIM)

    def table(spatial, temporal):  # the sin-cos positions of that grid, (tokens, dim)
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return (
            get_3d_sincos_pos_embed(dim, (8, 8), 3, spatial, temporal, output_type="pt").flatten(0, 1).float()
        )

    with torch.no_grad():
        with canvas_positions(model, 64, 9):
            inside = model.patch_embed(text, x)
        outside = model.patch_embed(text, x)
    assert torch.equal(inside[:, : tiny.TEXT_LENGTH], outside[:, : tiny.TEXT_LENGTH])  # text has no positions
    moved = inside[0, tiny.TEXT_LENGTH :] - outside[0, tiny.TEXT_LENGTH :]
    expected = table(2.0, 1.0) - table(
        cfg["spatial_interpolation_scale"], cfg["temporal_interpolation_scale"]
    )
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=1e-5)
    assert moved.abs().max() > 0.1
    embed = model.patch_embed
    assert (embed.spatial_interpolation_scale, embed.temporal_interpolation_scale) == (
        cfg["spatial_interpolation_scale"],
        cfg["temporal_interpolation_scale"],
    )


def _weights(folder):
    from safetensors.torch import load_file

    return {part: load_file(next((folder / part).glob("*.safetensors"))) for part in ("transformer", "vae")}


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    for part in wa:
        assert wa[part].keys() == wb[part].keys(), part
        assert all(torch.equal(wa[part][k], wb[part][k]) for k in wa[part]), part


def test_training_is_reproducible_from_its_seed(quick_model, tmp_path):
    again = tmp_path / "again"
    assert main(["--out", str(again), "--quick", "--seed", "3"]) == 0
    _assert_same_weights(quick_model, again)
    other = tmp_path / "other"
    assert main(["--out", str(other), "--quick", "--seed", "4"]) == 0
    assert not torch.equal(
        _weights(quick_model)["transformer"]["proj_out.weight"],
        _weights(other)["transformer"]["proj_out.weight"],
    )


def test_a_run_continued_from_checkpoints_writes_the_same_weights(quick_model, tmp_path):
    """Interrupted after the first transformer stage, then the same command again == one uninterrupted run."""
    ck = tmp_path / "ck"
    first = tmp_path / "first"
    assert main(["--out", str(first), "--quick", "--seed", "3", "--checkpoints", str(ck)]) == 0
    _assert_same_weights(quick_model, first)
    saved = {f.name for f in ck.iterdir()}
    assert {
        "vae.safetensors",
        "transformer-A.safetensors",
        "transformer-B.safetensors",
        "decoder.json",
    } <= saved
    for name in ("transformer-B", "transformer-C", "decoder"):  # as if the run had stopped during stage B
        (ck / f"{name}.json").unlink()
        (ck / f"{name}.safetensors").unlink()
    saved_a = json.loads((ck / "transformer-A.json").read_text())
    report_a = {**saved_a["report"], "marker": 1}
    (ck / "transformer-A.json").write_text(json.dumps({**saved_a, "report": report_a}))
    resumed = tmp_path / "resumed"
    assert main(["--out", str(resumed), "--quick", "--seed", "3", "--checkpoints", str(ck)]) == 0
    _assert_same_weights(quick_model, resumed)
    info = json.loads((resumed / "training.json").read_text())
    assert info["transformer"][0] == report_a  # stage A was loaded, not trained again
    assert "marker" not in info["transformer"][1]
    # another recipe (seed) must not pick up these stages
    with pytest.raises(SystemExit, match=r"'vae'.*another recipe.*seed"):
        main(["--out", str(tmp_path / "x"), "--quick", "--seed", "4", "--checkpoints", str(ck)])
    assert not (tmp_path / "x").exists()


def test_a_finished_later_stage_makes_the_earlier_stage_weights_unneeded(quick_model, tmp_path):
    """Stage A's weights are replaced by stage B's: with B finished, A is neither trained nor loaded (its report is
    kept), and the result is the same as an uninterrupted run."""
    ck = tmp_path / "ck"
    assert main(["--out", str(tmp_path / "first"), "--quick", "--seed", "3", "--checkpoints", str(ck)]) == 0
    (ck / "transformer-A.safetensors").unlink()
    for name in ("transformer-C", "decoder"):
        (ck / f"{name}.json").unlink()
        (ck / f"{name}.safetensors").unlink()
    resumed = tmp_path / "resumed"
    assert main(["--out", str(resumed), "--quick", "--seed", "3", "--checkpoints", str(ck)]) == 0
    _assert_same_weights(quick_model, resumed)
    (ck / "transformer-A.json").unlink()  # its report is needed for the model card
    with pytest.raises(SystemExit, match="transformer-A"):
        main(["--out", str(tmp_path / "x"), "--quick", "--seed", "3", "--checkpoints", str(ck)])


def test_locality_probe_computes_the_stock_attention_and_the_share_outside_each_window():
    """Oracle: the stock CogVideoX processor's output, and the share of the attention on the video keys that falls
    outside each window, from a dense fp64 softmax (text keys left out)."""
    import math

    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    from dit_sparse.pipelines.tiny_train import LocalityProbe

    torch.manual_seed(0)
    cfg = {
        **tiny.TRANSFORMER_CONFIG,
        "num_layers": 1,
        "sample_height": 5,
        "sample_width": 7,
        "sample_frames": 9,
    }
    model = CogVideoXTransformer3DModel(**cfg).eval()
    attn = model.transformer_blocks[0].attn1
    grid, windows = (3, 5, 7), [(1, 2, 1), (0, 1, 3)]
    text = torch.randn(2, tiny.TEXT_LENGTH, attn.to_q.in_features)
    video = torch.randn(2, 3 * 5 * 7, attn.to_q.in_features)
    probe = LocalityProbe(grid, windows, queries=9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = CogVideoXAttnProcessor2_0()(attn, video, text)
        got = probe(attn, video, text)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert probe.outside == []  # no term without gradients

    rows = torch.randint(3 * 5 * 7, (9,), generator=torch.Generator().manual_seed(1))  # the probe's draw
    probe.generator.manual_seed(1)
    probe(attn, video, text)
    share = probe.take()
    x = torch.cat([text, video], 1).double()
    n_text = text.shape[1]

    def proj(lin, norm, h):  # head h's normalised projection in fp64
        w = lin.weight.double().view(attn.heads, -1, lin.in_features)[h]
        b = lin.bias.double().view(attn.heads, -1)[h]
        y = x @ w.T + b
        return torch.nn.functional.layer_norm(
            y, (y.shape[-1],), norm.weight.double(), norm.bias.double(), norm.eps
        )

    expected = []
    for h in range(attn.heads):
        q, k = proj(attn.to_q, attn.norm_q, h), proj(attn.to_k, attn.norm_k, h)
        p = (q[:, n_text + rows] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # (2, 9, n)
        on_video = p[:, :, n_text:].sum(-1)  # (2, 9): the share is of the attention on the video keys
        for i, r in enumerate(rows.tolist()):
            fq, yq, xq = r // 35, (r // 7) % 5, r % 7
            for j in range(3 * 5 * 7):
                fk, yk, xk = j // 35, (j // 7) % 5, j % 7
                ef, ey, ex = windows[h]
                if abs(fk - fq) <= ef and abs(yk - yq) <= ey and abs(xk - xq) <= ex:
                    p[:, i, n_text + j] = 0
            p[:, i, :n_text] = 0
        expected.append((p.sum(-1) / on_video).mean())
    torch.testing.assert_close(share.double(), torch.stack(expected).mean(), atol=1e-5, rtol=1e-5)
    assert 0 < float(share.detach()) < 1
    assert probe.outside == []


def test_a_changed_later_stage_reuses_the_earlier_checkpoints(tmp_path):
    from dit_sparse.pipelines.tiny_train import Recipe, stage_depends

    recipe = Recipe.quick()
    changed = Recipe.quick()
    changed.stages[1].steps += 1
    changed.decoder_steps += 1
    for name in ("vae", "transformer-A"):
        assert stage_depends(recipe, name) == stage_depends(changed, name)
    for name in ("transformer-B", "decoder"):
        assert stage_depends(recipe, name) != stage_depends(changed, name)
    changed.seed = 9
    assert stage_depends(recipe, "transformer-A") != stage_depends(changed, "transformer-A")


def test_training_never_clobbers_an_existing_folder(tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(SystemExit, match="--force"):
        main(["--out", str(out), "--quick"])
    assert (out / "mine.txt").read_text() == "user data"


def test_loaded_model_normalises_positions_to_each_call_canvas_as_in_training():
    """``normalise_positions`` (what ``load_tiny_pipeline`` installs) gives, on any canvas, the transformer output
    that training's ``canvas_positions`` gives for that canvas; at the trained canvas, the configured positions."""
    from diffusers import CogVideoXTransformer3DModel

    from dit_sparse.pipelines.tiny_train import canvas_positions

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**{**tiny.TRANSFORMER_CONFIG, "num_layers": 1}).eval()
    text = torch.randn(1, tiny.TEXT_LENGTH, tiny.TEXT_DIM)
    step = torch.tensor([500])

    def run(frames: int, rows: int) -> torch.Tensor:
        x = torch.randn(1, frames, 16, rows, rows, generator=torch.Generator().manual_seed(frames * rows))
        with torch.no_grad():
            return model(x, text, step, return_dict=False)[0]

    canvases = [(3, 8), (5, 13)]  # 64 px x 9 frames; 104 px x 17 frames (odd sizes on purpose)
    with torch.no_grad():
        plain = {c: run(*c) for c in canvases}
        trained_frames, trained_rows, _ = tiny.latent_shape(**tiny.TRAINED_CANVAS)
        trained = run(trained_frames, trained_rows)
        handle = tiny.normalise_positions(model)
        hooked = {c: run(*c) for c in canvases}
        hooked_trained = run(trained_frames, trained_rows)
        handle.remove()
        for frames, rows in canvases:
            with canvas_positions(model, rows * 8, (frames - 1) * 4 + 1):
                expected = run(frames, rows)
            assert torch.equal(hooked[(frames, rows)], expected)
            assert not torch.allclose(plain[(frames, rows)], expected)  # the hook changed something
    assert torch.equal(hooked_trained, trained)
    assert run(3, 8).equal(plain[(3, 8)])  # removed: the configured positions again
