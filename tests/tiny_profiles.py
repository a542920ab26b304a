"""A sparse profile for the bundled tiny model, for tests of the sparse path.

The shipped ``profiles/tiny-cogvideox.json`` keeps a layer and the first steps dense (see profiles/README.md), so tests that need
sparse heads in every layer of the real bundled model use this: the shipped file with a mix of static sparse heads, one dense head
and one dense warm-up step."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

SHIPPED = "tiny-cogvideox.json"
SPARSE_HEADS = [
    [
        ("window", {"f": 1, "h": 2, "w": 2}),
        ("tile_window", {"tf": 2, "th": 2, "tw": 2, "wf": 1, "wh": 1, "ww": 1}),
    ],
    [("window", {"f": 0, "h": 1, "w": 3}), ("dense", {})],
    [("radial", {"band": 64, "dense_frames": 1, "sink": 1}), ("window", {"f": 2, "h": 1, "w": 1})],
    [("window", {"f": 1, "h": 3, "w": 2}), ("window", {"f": 0, "h": 2, "w": 2})],
]


def shipped_profile_dict() -> dict:
    """The shipped profile of the bundled model, as the JSON it is."""
    return json.loads(resources.files("dit_sparse.profiles").joinpath(SHIPPED).read_text(encoding="utf-8"))


def sparse_profile_dict() -> dict:
    d = shipped_profile_dict()
    d["layers"] = [[{"pattern": p, "params": q} for p, q in heads] for heads in SPARSE_HEADS]
    d["schedule"] = {"dense_steps": 1, "dense_layers": [], "refresh_interval": 0}
    d["summary"] = {}
    return d


def write_sparse_profile(path: Path) -> Path:
    path.write_text(json.dumps(sparse_profile_dict()))
    return path
