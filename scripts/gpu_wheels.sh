#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks into .whl/ (git-ignored), for `bash benchmarks/gpu_check.sh` there.
#
# The device image has torch, triton, transformers, accelerate, torchmetrics, imageio and huggingface_hub, but not
# diffusers (and diffusers' importlib_metadata). Run this here (it needs PyPI), then name `.whl` in the device
# call's `carry`; gpu_check.sh installs them into /tmp/site before anything else. Pure-Python wheels: any platform.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "diffusers==0.42.1" "importlib_metadata==8.7.0"
ls -l .whl
