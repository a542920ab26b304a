"""Package contract: light import, the dit_sparse namespace mapping, shipped data, console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources


def _run(code: str, cwd: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cwd, env=env
    ).stdout.strip()


def test_import_is_light_and_initialises_no_cuda(tmp_path):
    out = _run(
        "import sys, dit_sparse, torch; "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'triton', 'gradio', 'transformers'}); "
        "print(heavy, torch.cuda.is_initialized())",
        cwd=str(tmp_path),
    )
    assert out == "[] False"


def test_folders_are_mapped_into_the_dit_sparse_namespace(tmp_path):
    # `kernels` and `pipelines` must not become top-level packages (a PyPI package called `kernels` exists)
    out = _run(
        "import importlib.util as u, dit_sparse.kernels, dit_sparse.pipelines, dit_sparse.profiles; "
        "print(u.find_spec('pipelines') is None, dit_sparse.kernels.sparse_attention.__module__)",
        cwd=str(tmp_path),
    )
    assert out == "True dit_sparse.kernels.api"


def test_shipped_profiles_are_valid_json_profiles():
    from dit_sparse import Profile

    files = [p for p in resources.files("dit_sparse.profiles").iterdir() if p.name.endswith(".json")]
    assert files, "no shipped profile found"
    for f in files:
        prof = Profile.loads(f.read_text(encoding="utf-8"), source=f.name)
        assert json.loads(f.read_text(encoding="utf-8"))["schema_version"] == prof.schema_version


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "dit_sparse", "--help"], capture_output=True, text=True, check=True
    )
    assert "generate" in out.stdout and "bench" in out.stdout
