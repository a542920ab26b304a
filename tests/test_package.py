"""Package contract: light import, the dit_sparse namespace mapping, shipped data, console script."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest


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


def test_kernels_folder_never_shadows_the_installed_kernels_package_from_the_repository_root():
    # transformers >= 5.25 imports the Hugging Face `kernels` package; with the repository root on sys.path
    # (`python -m ...` from there), `import kernels` finds our folder first and must hand on to the installed one
    root = str(Path(__file__).resolve().parents[1])
    code = (
        "import kernels, dit_sparse.kernels as ours; "
        "print(kernels.__file__ != ours.__file__, ours.sparse_attention.__module__)"
    )
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the Hugging Face `kernels` package is not installed here")
    assert _run(code, cwd=root) == "True dit_sparse.kernels.api"
    assert _run("import transformers.integrations.hub_kernels", cwd=root) == ""


def test_kernels_folder_imported_as_top_level_without_the_package_names_the_problem():
    root = str(Path(__file__).resolve().parents[1])
    # -S: no site-packages, so only the repository root can provide `kernels`
    r = subprocess.run(
        [sys.executable, "-S", "-c", "import kernels"], capture_output=True, text=True, cwd=root
    )
    assert r.returncode != 0
    assert "No module named 'kernels' is installed" in r.stderr and "dit_sparse.kernels" in r.stderr


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
