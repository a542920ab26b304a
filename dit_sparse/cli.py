"""The ``dit-sparse`` command line: one entry point, one subcommand per job, ``--help`` on each."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _bench_kernel(args: argparse.Namespace) -> int:
    from dit_sparse.benchmarks.kernel import run_from_args

    return run_from_args(args)


def _bench_patterns(args: argparse.Namespace) -> int:
    from dit_sparse.benchmarks.patterns import run_from_args

    return run_from_args(args)


def _bench_e2e(args: argparse.Namespace) -> int:
    from dit_sparse.benchmarks.e2e import run_from_args

    return run_from_args(args)


def _generate(args: argparse.Namespace) -> int:
    from dit_sparse.generate import run

    run(args)
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from dit_sparse.generate import add_generate_args

    gen = sub.add_parser(
        "generate",
        help="prompt -> video, dense and sparse; prints time, density, speedup, PSNR/SSIM",
        description=(
            "Generate a video with a diffusers pipeline, dense and/or with sparse attention, and compare them: wall "
            "time, mean attention density, speedup, PSNR and SSIM per frame. Writes dense.mp4, sparse.mp4, "
            "side_by_side.mp4 and report.json into a new folder under --out. Default: the bundled tiny model."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_generate_args(gen)
    gen.set_defaults(func=_generate)


def _eval(args: argparse.Namespace) -> int:
    from dit_sparse.eval import run

    return run(args)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from dit_sparse.eval import add_eval_args

    ev = sub.add_parser(
        "eval",
        help="dense vs sparse on the same prompts/seeds: PSNR/SSIM per frame, time, density; JSON + table",
        description=(
            "Generate every prompt with every seed twice, dense and with the profile, with the same steps, size and "
            "guidance, and compare: PSNR and SSIM per frame (mean and worst frame), dense and sparse wall time, "
            "mean attention density. Prints a table and writes a JSON (with the versions, device and command) to "
            "benchmarks/results/ or --out; an existing file is never replaced without --force."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_eval_args(ev)
    ev.set_defaults(func=_eval)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="kernel and end-to-end benchmarks",
        description="Benchmarks. Results go to benchmarks/results/ as JSON with the GPU, versions and command.",
    )
    bsub = bench.add_subparsers(dest="bench_cmd", metavar="{kernel,patterns,e2e}")
    bsub.required = True
    kernel = bsub.add_parser(
        "kernel",
        help="block-sparse kernel vs cuDNN/FA2 SDPA and FlexAttention on DiT shapes",
        description=(
            "Time dit-sparse's block-sparse attention against dense SDPA (cuDNN, FA2) and FlexAttention with the "
            "same mask, on the attention shapes of Wan2.1, HunyuanVideo, CogVideoX and FLUX, at several densities. "
            "On a machine without a GPU use --tiny: it proves the benchmark runs, its timings are not kernel "
            "performance."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from dit_sparse.benchmarks.kernel_args import add_kernel_bench_args

    add_kernel_bench_args(kernel)
    kernel.set_defaults(func=_bench_kernel)
    patterns = bsub.add_parser(
        "patterns",
        help="each sparsity pattern at its defaults vs cuDNN SDPA, with mask/permutation/draft overheads",
        description=(
            "Time every sparsity pattern at its default parameters (or those given) on the Wan2.1-1.3B 480p and "
            "HunyuanVideo 720p layer layouts against dense cuDNN SDPA, with the mask build, permutation and draft "
            "overheads timed separately, in ms and as % of the dense time. On a machine without a GPU use --tiny: "
            "it proves the benchmark runs, its timings are not kernel performance."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from dit_sparse.benchmarks.patterns_args import add_patterns_bench_args

    add_patterns_bench_args(patterns)
    patterns.set_defaults(func=_bench_patterns)
    e2e = bsub.add_parser(
        "e2e",
        help="one denoising step of full-size DiTs (random weights), dense vs sparse, + a 50-step estimate",
        description=(
            "Build Wan2.1-1.3B/14B, HunyuanVideo, CogVideoX-5B and FLUX transformers from their published configs "
            "with random weights (no download) and time one denoising step (one transformer forward, batch 2 when the "
            "pipeline uses classifier-free guidance, the pipeline's text lengths): "
            "dense with diffusers' default attention and with cuDNN SDPA, through the plugin with a dense profile, "
            "and sparse with uniform radial / window profiles and draft at each target density. Reports attention "
            "time, draft/mask/hook overheads, peak GPU memory, a full-schedule estimate with dense warm-up steps, "
            "and (--compile) the same under torch.compile. On a machine without a GPU use --tiny: tiny configs of "
            "the same classes on the CPU prove the benchmark runs; their timings are not GPU performance."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from dit_sparse.benchmarks.e2e_args import add_e2e_bench_args

    add_e2e_bench_args(e2e)
    e2e.set_defaults(func=_bench_e2e)


def _demo(args: argparse.Namespace) -> int:
    try:
        from dit_sparse.app.ui import launch  # gradio is imported here only, never at CLI start-up
    except ImportError as exc:
        print(
            f"error: the demo needs gradio ({exc}); install it with: pip install 'dit-sparse[demo]'",
            file=sys.stderr,
        )
        return 2
    from dit_sparse.app.core import DemoError

    try:
        launch(model=args.model, profile=args.profile, host=args.host, port=args.port, share=args.share)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="the Gradio app: dense vs sparse generations side by side",
        description=(
            "Serve a Gradio app that generates one prompt dense and sparse and shows both videos, wall times, "
            "speedup, density, PSNR/SSIM per frame, a per-layer x head density heatmap and block masks. Works "
            "offline on the bundled tiny model. Needs gradio: pip install 'dit-sparse[demo]'."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (bundled) or a diffusers model id / local folder (local cache only)",
    )
    demo.add_argument(
        "--profile",
        default="auto",
        help="profile JSON offered first in the app, or 'auto' (the shipped ones)",
    )
    demo.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network"
    )
    demo.add_argument("--port", type=int, default=7860, help="port to serve on")
    demo.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    demo.set_defaults(func=_demo)


def _profile(args: argparse.Namespace) -> int:
    from dit_sparse.profiler.cli import run_profile

    return run_profile(args)


def _inspect(args: argparse.Namespace) -> int:
    from dit_sparse.profiler.cli import run_inspect_cli

    return run_inspect_cli(args)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    from dit_sparse.profiler.cli import PROFILE_DESCRIPTION, add_inspect_args, add_profile_args

    prof = sub.add_parser(
        "profile",
        help="calibrate a DiT and write its sparse-attention profile (JSON)",
        description=PROFILE_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_profile_args(prof)
    prof.set_defaults(func=_profile)
    insp = sub.add_parser(
        "inspect",
        help="what a profile holds: per-layer pattern mix and density, PNG heatmaps",
        description="Print a profile's per-layer pattern mix, density and error; --png-dir also writes pictures.",
    )
    add_inspect_args(insp)
    insp.set_defaults(func=_inspect)


def build_parser() -> argparse.ArgumentParser:
    from dit_sparse import __version__

    parser = argparse.ArgumentParser(
        prog="dit-sparse",
        description="Training-free sparse attention for diffusion transformers in diffusers.",
    )
    parser.add_argument("--version", action="version", version=f"dit-sparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_generate(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_demo(sub)
    _add_profile(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
