"""The gradio Blocks of ``dit-sparse demo``: widgets wired to :mod:`dit_sparse.app.core`.

Every handler turns a failure into a message in the UI (``gr.Error``: a toast, plus the status box), never a
traceback; unexpected exceptions are logged with their traceback on the server console only.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import gradio as gr
import numpy as np

from ..profile import MAX_PROFILE_BYTES
from .core import (
    DENSE_CHOICE,
    EXAMPLE_PROMPTS,
    PSNR_PLOT_CAP,
    UPLOAD_CHOICE,
    Comparison,
    DemoError,
    DemoSession,
    Settings,
    choose_profile,
    demo_layout,
    density_table,
    first_sparse_head,
    fmt_psnr,
    has_windows,
    head_mask,
    heatmap_image,
    mask_image,
    psnr_points,
)

log = logging.getLogger("dit_sparse.app")

INTRO = """# dit-sparse: dense vs sparse attention
The same prompt, seed and settings are generated twice: once with the model's own (dense) attention, once with the
block-sparse attention of the chosen profile. Compare the videos, the wall times and the per-frame PSNR; the heatmap
shows how much of each head's attention the profile computes, the mask how a head's blocks are chosen."""


def user_message(exc: BaseException) -> str:
    """One line a user can act on, for any failure of a generation or preview."""
    from ..integration import SparseApplyError
    from ..pipelines import UnsupportedModelError
    from ..profile import ProfileError

    if isinstance(exc, DemoError | ProfileError | SparseApplyError | UnsupportedModelError):
        return str(exc)
    name = type(exc).__name__
    if "OutOfMemory" in name or "out of memory" in str(exc).lower():
        return "out of memory: choose a smaller resolution, fewer frames or fewer steps"
    if isinstance(exc, SystemExit):
        return str(exc.code)
    if isinstance(exc, ValueError):  # diffusers' input checks (sizes, frames) say what they need
        return f"invalid settings: {exc}"
    return f"generation failed ({name}: {exc}); the server log has the details"


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn``; any exception becomes a ``gr.Error`` with :func:`user_message` (details go to the log)."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            log.exception("dit-sparse demo: %s failed", getattr(fn, "__name__", "handler"))
            raise gr.Error(user_message(exc), duration=None) from None

    wrapped.__name__ = getattr(fn, "__name__", "handler")
    wrapped.__doc__ = fn.__doc__
    return wrapped


def _settings(
    prompt: str, seed: Any, steps: Any, height: Any, width: Any, frames: Any, guidance: Any
) -> Settings:
    try:
        return Settings(
            prompt=str(prompt or ""),
            seed=int(seed),
            steps=int(steps),
            height=int(height),
            width=int(width),
            frames=int(frames),
            guidance=float(guidance),
        )
    except (TypeError, ValueError) as exc:
        raise DemoError(f"seed, steps, height, width and frames must be whole numbers ({exc})") from None


def _target(value: Any) -> float | None:
    v = float(value or 0.0)
    return v if v > 0 else None


def density_summary(table: np.ndarray) -> str:
    """The heatmap's mean density in words. Dynamic heads (NaN in ``table``) are left out of the mean and counted:
    their density is known only once a generation ran (the run's mean density field has it)."""
    dynamic = int(np.isnan(table).sum())
    if dynamic == table.size:
        return f"all {dynamic} heads dynamic: their density is measured during generation"
    text = f"sparse-step density {float(np.nanmean(table)):.3f} (mean over "
    if not dynamic:
        return text + "heads)"
    return (
        text
        + f"the {table.size - dynamic} static heads; {dynamic} dynamic head(s) are measured during generation)"
    )


def preview(
    session: DemoSession,
    choice: str,
    upload: str | None,
    height: Any,
    width: Any,
    frames: Any,
    target: Any,
    layer: Any,
    head: Any,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Heatmap, mask picture and a one-line summary for the current profile, knob and size (no generation)."""
    settings = Settings(height=int(height), width=int(width), frames=int(frames))
    profile = session.profile(choice, upload, settings, _target(target))
    layout = demo_layout(session.pipe, settings, profile.block_size)
    table = density_table(profile, layout)
    mask = head_mask(profile, layout, int(layer), int(head))
    f, h, w = layout.grid
    info = (
        f"latent grid {f}×{h}×{w} = {layout.seq_len} tokens, {layout.num_blocks} blocks of {profile.block_size}; "
        f"{density_summary(table)}; first {profile.schedule.dense_steps} step(s) dense"
    )
    if _target(target) and not has_windows(profile):
        info += "; the density knob resizes window heads and this profile has none"
    return heatmap_image(table), mask_image(mask, layout), info


def results(cmp: Comparison, layer: int, head: int) -> dict[str, Any]:
    """What the output widgets show for one comparison (plain values: tested without a browser)."""
    import pandas as pd

    m = cmp.metrics
    report = cmp.sparse.report or {}
    step_d = list((report.get("per_layer_step_density") or {}).values())
    density = f"{cmp.sparse.mean_density:.3f}"
    if step_d:
        density += f" (sparse steps {sum(step_d) / len(step_d):.3f})"
    points = psnr_points(m["psnr_per_frame"])
    plot = pd.DataFrame({"frame": [p[0] for p in points], "PSNR (dB)": [p[1] for p in points]})
    out: dict[str, Any] = {
        "dense_video": str(cmp.dense_video),
        "sparse_video": str(cmp.sparse_video),
        "pair_video": str(cmp.pair_video),
        "dense_time": f"{cmp.dense.seconds:.2f} s" + (" (cached)" if cmp.dense_cached else ""),
        "sparse_time": f"{cmp.sparse.seconds:.2f} s",
        "speedup": f"{cmp.speedup:.2f}×",
        "density": density,
        "psnr": f"{fmt_psnr(m['psnr_mean'])} (worst frame {fmt_psnr(m['psnr_min'])})",
        "ssim": f"{m['ssim_mean']:.4f} (worst frame {m['ssim_min']:.4f})",
        "psnr_plot": plot,
        "heatmap": None,
        "mask": None,
    }
    if cmp.layout is not None:
        out["heatmap"] = heatmap_image(density_table(cmp.profile, cmp.layout))
        out["mask"] = mask_image(head_mask(cmp.profile, cmp.layout, layer, head), cmp.layout)
    notes = [*cmp.notes]
    if cmp.dense_cached:
        notes.append(
            "dense side from the cache (same prompt, seed and settings); its time is the first run's"
        )
    if any(math.isinf(p) for p in m["psnr_per_frame"]):
        notes.append(f"identical frames have infinite PSNR: the plot draws them at {PSNR_PLOT_CAP:.0f} dB")
    out["status"] = "done. " + " · ".join(notes) if notes else "done."
    return out


OUTPUT_KEYS = (
    "dense_video",
    "sparse_video",
    "pair_video",
    "dense_time",
    "sparse_time",
    "speedup",
    "density",
    "psnr",
    "ssim",
    "psnr_plot",
    "heatmap",
    "mask",
    "status",
)


def build_demo(session: DemoSession) -> gr.Blocks:
    from ..pipelines import family_for

    fp = family_for(session.pipe.transformer).fingerprint(session.pipe.transformer)
    defaults = Settings()
    try:  # the mask picture opens on a head the default profile makes sparse
        start_layer, start_head = first_sparse_head(
            choose_profile(session.default_choice, None, session.pipe, session.extra)
        )
    except DemoError:
        start_layer, start_head = 0, 0
    with gr.Blocks(title="dit-sparse demo", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                prompt = gr.Textbox(label="Prompt", value=defaults.prompt, lines=2, elem_id="prompt")
                gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="Example prompts")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=defaults.seed, precision=0, elem_id="seed")
                    steps = gr.Slider(1, 50, value=defaults.steps, step=1, label="Steps", elem_id="steps")
                with gr.Row():
                    height = gr.Slider(32, 512, value=defaults.height, step=16, label="Height (px)")
                    width = gr.Slider(32, 512, value=defaults.width, step=16, label="Width (px)")
                frames = gr.Slider(
                    1, 81, value=defaults.frames, step=4, label="Frames (4k+1)", elem_id="frames"
                )
                guidance = gr.Slider(1.0, 10.0, value=defaults.guidance, step=0.5, label="Guidance scale")
                profile = gr.Dropdown(
                    session.profile_choices(),
                    value=session.default_choice,
                    label="Profile",
                    info=f"shipped profiles, '{DENSE_CHOICE}' (sparse side = dense), or '{UPLOAD_CHOICE}'",
                    elem_id="profile",
                )
                upload = gr.File(
                    label=f"Upload a profile JSON (≤ {MAX_PROFILE_BYTES // 2**20} MiB)",
                    file_types=[".json"],
                    type="filepath",
                    elem_id="profile_upload",
                )
                target = gr.Slider(
                    0.0,
                    1.0,
                    value=0.0,
                    step=0.05,
                    label="Density target (0 = profile as is)",
                    info="resizes every window head to the largest window computing at most this fraction",
                    elem_id="density_target",
                )
                run = gr.Button("Generate dense + sparse", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id="status")
                with gr.Row():
                    dense_video = gr.Video(
                        label="dense", autoplay=True, loop=True, interactive=False, elem_id="dense_video"
                    )
                    sparse_video = gr.Video(
                        label="sparse", autoplay=True, loop=True, interactive=False, elem_id="sparse_video"
                    )
                with gr.Accordion("dense | sparse as one clip (in sync)", open=False):
                    pair_video = gr.Video(
                        label="dense | sparse",
                        autoplay=True,
                        loop=True,
                        interactive=False,
                        elem_id="pair_video",
                    )
                with gr.Row():
                    dense_time = gr.Textbox(label="Dense time", interactive=False, elem_id="dense_time")
                    sparse_time = gr.Textbox(label="Sparse time", interactive=False, elem_id="sparse_time")
                    speedup = gr.Textbox(label="Speedup", interactive=False, elem_id="speedup")
                    density = gr.Textbox(label="Mean density", interactive=False, elem_id="density")
                with gr.Row():
                    psnr = gr.Textbox(label="PSNR (mean)", interactive=False, elem_id="psnr")
                    ssim = gr.Textbox(label="SSIM (mean)", interactive=False, elem_id="ssim")
                psnr_plot = gr.LinePlot(
                    x="frame", y="PSNR (dB)", label="PSNR per frame (sparse vs dense)", elem_id="psnr_plot"
                )
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("**Density** per layer (rows) × head (columns), sparse steps")
                        heatmap = gr.Image(show_label=False, interactive=False, elem_id="heatmap")
                    with gr.Column():
                        gr.Markdown(
                            "**Block mask** of one head: query blocks ↓, key blocks →, computed = yellow"
                        )
                        mask = gr.Image(show_label=False, interactive=False, elem_id="mask")
                        layer = gr.Slider(
                            0, fp.num_layers - 1, value=start_layer, step=1, label="Layer", elem_id="layer"
                        )
                        head = gr.Slider(
                            0, fp.num_heads - 1, value=start_head, step=1, label="Head", elem_id="head"
                        )
                mask_info = gr.Markdown(elem_id="mask_info")

        def do_preview(*values: Any) -> tuple[Any, Any, str]:
            return preview(session, *values)

        preview_inputs = [profile, upload, height, width, frames, target, layer, head]
        preview_outputs = [heatmap, mask, mask_info]
        guarded_preview = _guard(do_preview)
        for widget in (profile, height, width, frames, target, layer, head):
            widget.change(guarded_preview, preview_inputs, preview_outputs, queue=False)
        upload.upload(lambda _: UPLOAD_CHOICE, [upload], [profile], queue=False)
        demo.load(guarded_preview, preview_inputs, preview_outputs)

        def do_generate(
            prompt_v: str,
            seed_v: Any,
            steps_v: Any,
            height_v: Any,
            width_v: Any,
            frames_v: Any,
            guidance_v: Any,
            choice: str,
            upload_v: str | None,
            target_v: Any,
            layer_v: Any,
            head_v: Any,
            progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 (gradio's injection idiom)
        ) -> tuple[Any, ...]:
            settings = _settings(prompt_v, seed_v, steps_v, height_v, width_v, frames_v, guidance_v)
            cmp = session.compare(settings, choice, upload_v, _target(target_v), progress=progress)
            out = results(cmp, int(layer_v), int(head_v))
            return tuple(out[k] for k in OUTPUT_KEYS)

        run.click(
            _guard(do_generate),
            [prompt, seed, steps, height, width, frames, guidance, profile, upload, target, layer, head],
            [
                dense_video,
                sparse_video,
                pair_video,
                dense_time,
                sparse_time,
                speedup,
                density,
                psnr,
                ssim,
                psnr_plot,
                heatmap,
                mask,
                status,
            ],
            concurrency_limit=1,  # one pipeline: generations queue up and run one at a time
        )
    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo


def launch(
    model: str = "tiny",
    profile: str | None = "auto",
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    block: bool = True,
) -> tuple[gr.Blocks, str]:
    """Load the model, build the app and serve it; returns (demo, local URL). ``block=False`` returns at once."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    session = DemoSession(model=model, profile=profile)
    demo = build_demo(session)
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        allowed_paths=[str(session.out_dir)],
        max_file_size=MAX_PROFILE_BYTES,
        ssr_mode=False,
        quiet=not block,
    )
    return demo, url
