#!/usr/bin/env bash
# The GPU checks, as one prepared script for a short GPU lease: `bash benchmarks/gpu_check.sh STAGE...`.
#
# Runs in the repository root of a GPU machine whose python3 has torch + triton but no diffusers: wheels saved in
# .whl/ (diffusers, importlib_metadata) are installed into /tmp/site first, then this checkout editable. Each stage
# has its own time limit (SIGINT, then SIGKILL 15 s later), so one that hangs or fails does not cost the others;
# bench e2e and profile_wan.py still write the rows / stages they finished when the limit stops them. Everything goes
# to $OUT (default /tmp/gpu-out): the benchmarks' JSON/Markdown files and log.txt. Stages:
#   tests     a subset of the CUDA-only tests (compiled Triton kernel vs the fp64 reference, no host sync), the
#             prepared-index and block_mean tests on CUDA
#   alltests  every CUDA-only test
#   kernel    dit-sparse bench kernel on the Wan2.1-1.3B 480p shape (cuDNN, FA2, Flex, ours)
#   patterns  dit-sparse bench patterns on the Wan2.1-1.3B 480p layout (every pattern; mask, perm, in-kernel
#             gather and draft overheads against cuDNN dense)
#   e2e13     dit-sparse bench e2e, Wan2.1-1.3B 480p, every pattern at densities 0.25 and 0.1
#   e2e14     dit-sparse bench e2e, Wan2.1-14B 720p, radial at density 0.1, 1 warm-up + 1 timed step
#   compile13 dit-sparse bench e2e --compile, Wan2.1-1.3B 480p, radial at density 0.1
#   profile   benchmarks/profile_wan.py: the profiler on a random-weight Wan2.1-1.3B-shaped pipeline at 480p
#             (extra options in $PROFILE_ARGS, e.g. "--num-prompts 1 --no-verify")
#   e2eothers dit-sparse bench e2e, CogVideoX-5B 49f and FLUX.1-dev 1024², radial and window at 0.25 and 0.1
#   e2ehy     dit-sparse bench e2e, HunyuanVideo 720p 129f, radial at density 0.1, 1 warm-up + 1 timed step
#   eval      dit-sparse eval of the bundled tiny model with its shipped profile on the GPU (bf16)
#
# Device time is short (15 minutes a session, the machine's start included) and one call runs 10 minutes at most:
# stage limits below are upper bounds; a call's stages should add up to well under 600 s. In order of what is owed:
#   bash benchmarks/gpu_check.sh profile               (#7: estimated 6-9 minutes, the whole call)
#   bash benchmarks/gpu_check.sh kernel compile13      (#9: kernel with prepared index; Wan 1.3B under compile)
#   bash benchmarks/gpu_check.sh patterns e2eothers    (#9: overheads per pattern; CogVideoX-5B and FLUX)
#   bash benchmarks/gpu_check.sh e2ehy eval            (#9: HunyuanVideo; quality of the bundled model on the GPU)
# with `.whl` carried (scripts/gpu_wheels.sh fetches diffusers for it) and timeout_s 600.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

stamp setup
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || { echo "editable install failed"; exit 1; }
python3 -c "import torch, triton, diffusers, dit_sparse; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'diffusers', diffusers.__version__, \
'gpu', torch.cuda.get_device_name())" || exit 1

# The benchmarks run from outside the checkout: from its root, the top-level kernels/ folder is found as `kernels`,
# and where Hugging Face's `kernels` package is not installed (this image) transformers' hub_kernels import, reached
# from diffusers -> peft, fails (benchmarks/README.md).
REPO=$PWD

run() {  # run LIMIT_S CMD...: one stage under its own time limit
  local limit=$1; shift
  stamp "start (limit ${limit} s): $*"
  (cd /tmp && timeout --signal=INT --kill-after=15 "$limit" "$@")
  stamp "rc=$? $*"
}

for stage in "$@"; do
  case $stage in
    tests)  # the CUDA-only tests, then the device-agnostic ones that run on CUDA when it is there
      run 200 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
        "$REPO/tests/test_kernels.py::test_triton_cuda_matches_reference[16-64-dtype0]" \
        "$REPO/tests/test_kernels.py::test_triton_cuda_matches_reference[64-96-dtype1]" \
        "$REPO/tests/test_kernels.py::test_triton_cuda_matches_reference[128-128-dtype1]" \
        "$REPO/tests/test_kernels.py::test_triton_cuda_matches_reference[128-64-dtype0]" \
        "$REPO/tests/test_kernels.py::test_triton_cuda_launch_has_no_host_sync" \
        "$REPO/tests/test_indices.py::test_build_block_index_has_no_host_sync" \
        "$REPO/tests/test_kernels.py::test_prepared_index_gives_the_same_output" \
        "$REPO/tests/test_pooling.py" ;;
    alltests)
      run 400 python3 -m pytest -q -p no:cacheprovider -m gpu --rootdir "$REPO" "$REPO/tests/test_kernels.py" \
        "$REPO/tests/test_indices.py" "$REPO/tests/test_pooling.py" ;;
    kernel) run 150 python3 -m dit_sparse bench kernel --shapes wan2.1-1.3b-480p --densities 1 0.5 0.25 0.1 --out "$OUT" ;;
    patterns) run 200 python3 -m dit_sparse bench patterns --shapes wan2.1-1.3b-480p --out "$OUT" ;;
    e2e13) run 200 python3 -m dit_sparse bench e2e --models wan2.1-1.3b-480p --densities 0.25 0.1 --out "$OUT" ;;
    e2e14)
      run 300 python3 -m dit_sparse bench e2e --models wan2.1-14b-720p --densities 0.1 --patterns radial \
        --reps 1 --warmup 1 --out "$OUT" ;;
    compile13)
      run 300 python3 -m dit_sparse bench e2e --models wan2.1-1.3b-480p --densities 0.1 --patterns radial --compile \
        --out "$OUT" ;;
    profile) run 560 python3 "$REPO/benchmarks/profile_wan.py" --out "$OUT" ${PROFILE_ARGS:-} ;;
    e2eothers)
      run 240 python3 -m dit_sparse bench e2e --models cogvideox-5b flux-1024 --densities 0.25 0.1 \
        --patterns radial window --out "$OUT" ;;
    e2ehy)
      run 360 python3 -m dit_sparse bench e2e --models hunyuanvideo-720p --densities 0.1 --patterns radial \
        --reps 1 --warmup 1 --out "$OUT" ;;
    eval) run 200 python3 -m dit_sparse eval --device cuda --out "$OUT" ;;
    *) echo "unknown stage: $stage" ;;
  esac
done
stamp done
