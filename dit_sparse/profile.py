"""Profiles: which sparsity pattern each (layer, head) of a transformer runs, and when (DESIGN §6).

A profile is versioned JSON (never pickle) with provenance. Loading validates the schema; applying it checks the
architecture fingerprint against the model and names any mismatch.

    profile = Profile.load("wan2.1-t2v-1.3b.json")
    profile = Profile.dense(pipe.transformer)          # every head dense: output == no plugin
    profile.save("my.json")                              # atomic; refuses to overwrite unless overwrite=True
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__

SCHEMA_VERSION = 1
MAX_PROFILE_BYTES = 16 * 1024 * 1024  # a profile of 100 layers × 64 heads is ~1 MB; refuse absurd files


class ProfileError(ValueError):
    """A profile file is malformed, from another schema version, or does not fit the model."""


@dataclass(frozen=True)
class Fingerprint:
    """What a profile must agree on with the transformer it is applied to."""

    transformer_class: str
    num_layers: int  # self-attention layers the family adapter sparsifies, in its order
    num_heads: int
    head_dim: int
    patch_size: list[int] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.transformer_class} with {self.num_layers} layers × {self.num_heads} heads × {self.head_dim}"


@dataclass
class HeadSpec:
    """One head's choice: a pattern name from :mod:`dit_sparse.patterns` and its parameters."""

    pattern: str = "dense"
    params: dict[str, Any] = field(default_factory=dict)
    density: float | None = None  # measured or predicted fraction of blocks computed
    rel_error: float | None = None  # relative output error vs dense measured by the profiler


@dataclass
class Schedule:
    """When sparse attention runs. Steps are denoising steps (distinct timesteps), counted from 0."""

    dense_steps: int = 0  # the first `dense_steps` steps run dense (warm-up: early steps shape the layout)
    dense_layers: list[int] = field(default_factory=list)  # these layers always run dense
    refresh_interval: int = 0  # dynamic patterns: rebuild masks every N sparse steps (0 = every step)


@dataclass
class Profile:
    """Per (layer, head) patterns plus the step schedule, for one transformer architecture."""

    fingerprint: Fingerprint
    layers: list[list[HeadSpec]]
    family: str
    model_id: str | None = None
    block_size: int = 128
    schedule: Schedule = field(default_factory=Schedule)
    calibration: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    dit_sparse_version: str = __version__

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def dense(cls, transformer: Any, model_id: str | None = None) -> Profile:
        """A profile whose every head is dense: applying it leaves the output bit-identical to no plugin."""
        from .pipelines import family_for

        family = family_for(transformer)
        fp = family.fingerprint(transformer)
        layers = [[HeadSpec("dense") for _ in range(fp.num_heads)] for _ in range(fp.num_layers)]
        return cls(fingerprint=fp, layers=layers, family=family.name, model_id=model_id)

    @classmethod
    def uniform(
        cls,
        transformer: Any,
        pattern: str,
        params: dict[str, Any] | None = None,
        dense_steps: int = 0,
        block_size: int = 128,
        model_id: str | None = None,
    ) -> Profile:
        """Every head runs ``pattern(**params)``; handy for experiments and tests."""
        prof = cls.dense(transformer, model_id=model_id)
        prof.block_size = block_size
        prof.schedule.dense_steps = dense_steps
        prof.layers = [
            [HeadSpec(pattern, dict(params or {})) for _ in range(prof.fingerprint.num_heads)]
            for _ in range(prof.fingerprint.num_layers)
        ]
        prof.validate()
        return prof

    # ----------------------------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Check internal consistency and that every pattern is known with valid parameters."""
        from .patterns import validate_pattern

        if self.schema_version != SCHEMA_VERSION:
            raise ProfileError(
                f"profile schema_version {self.schema_version} is not supported (this dit-sparse reads "
                f"{SCHEMA_VERSION}); re-create it with `dit-sparse profile` or upgrade dit-sparse"
            )
        if self.block_size not in (16, 32, 64, 128):
            raise ProfileError(f"block_size must be 16, 32, 64 or 128, got {self.block_size}")
        fp = self.fingerprint
        if len(self.layers) != fp.num_layers:
            raise ProfileError(
                f"profile lists {len(self.layers)} layers but its fingerprint says {fp.num_layers}"
            )
        for i, heads in enumerate(self.layers):
            if len(heads) != fp.num_heads:
                raise ProfileError(f"layer {i} lists {len(heads)} heads, the fingerprint says {fp.num_heads}")
            for h, spec in enumerate(heads):
                try:
                    validate_pattern(spec.pattern, spec.params)
                except ValueError as exc:
                    raise ProfileError(f"layer {i} head {h}: {exc}") from None
        s = self.schedule
        if s.dense_steps < 0 or s.refresh_interval < 0:
            raise ProfileError("schedule.dense_steps and schedule.refresh_interval must be >= 0")
        bad = [layer for layer in s.dense_layers if not 0 <= layer < fp.num_layers]
        if bad:
            raise ProfileError(f"schedule.dense_layers {bad} out of range 0..{fp.num_layers - 1}")

    def check_compatible(self, fingerprint: Fingerprint, family: str) -> None:
        """Raise :class:`ProfileError` naming the mismatch if this profile was made for another architecture."""
        mine = self.fingerprint
        if family != self.family:
            raise ProfileError(
                f"profile is for the {self.family!r} family ({mine.transformer_class}), the transformer is "
                f"{fingerprint.transformer_class} ({family!r}); make a profile for it with `dit-sparse profile`"
            )
        if (mine.num_layers, mine.num_heads, mine.head_dim) != (
            fingerprint.num_layers,
            fingerprint.num_heads,
            fingerprint.head_dim,
        ):
            raise ProfileError(
                f"profile has {mine.num_layers} layers × {mine.num_heads} heads (head_dim {mine.head_dim}), "
                f"transformer has {fingerprint.num_layers} × {fingerprint.num_heads} (head_dim "
                f"{fingerprint.head_dim}); this profile was made for another model size"
            )
        if (
            mine.patch_size
            and fingerprint.patch_size
            and list(mine.patch_size) != list(fingerprint.patch_size)
        ):
            raise ProfileError(
                f"profile was made for patch size {mine.patch_size}, transformer uses {fingerprint.patch_size}"
            )

    # ----------------------------------------------------------------------------------------------- queries
    def layer_is_dense(self, layer: int, step: int) -> bool:
        """True if every head of ``layer`` runs dense at denoising step ``step``."""
        if step < self.schedule.dense_steps or layer in self.schedule.dense_layers:
            return True
        return all(spec.pattern == "dense" for spec in self.layers[layer])

    def mean_density(self) -> float | None:
        vals = [spec.density for heads in self.layers for spec in heads if spec.density is not None]
        return sum(vals) / len(vals) if vals else None

    # ----------------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "dit_sparse_version": self.dit_sparse_version,
            "model": {"id": self.model_id, "family": self.family, "fingerprint": asdict(self.fingerprint)},
            "block_size": self.block_size,
            "schedule": asdict(self.schedule),
            "calibration": copy.deepcopy(self.calibration),
            "layers": [[_head_to_dict(s) for s in heads] for heads in self.layers],
            "summary": copy.deepcopy(self.summary),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> Profile:
        if not isinstance(data, dict):
            raise ProfileError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise ProfileError(
                f"{source}: missing or invalid 'schema_version' (is this a dit-sparse profile?)"
            )
        if version > SCHEMA_VERSION:
            raise ProfileError(
                f"{source}: schema_version {version} is newer than this dit-sparse supports ({SCHEMA_VERSION}, "
                f"dit-sparse {__version__}); upgrade dit-sparse (`pip install -U dit-sparse`)"
            )
        if version < SCHEMA_VERSION:
            raise ProfileError(
                f"{source}: schema_version {version} is too old; re-create it with `dit-sparse profile`"
            )
        try:
            model = data["model"]
            fp = Fingerprint(**model["fingerprint"])
            layers = [[_head_from_dict(h) for h in heads] for heads in data["layers"]]
            prof = cls(
                fingerprint=fp,
                layers=layers,
                family=str(model["family"]),
                model_id=model.get("id"),
                block_size=int(data.get("block_size", 128)),
                schedule=Schedule(**data.get("schedule", {})),
                calibration=dict(data.get("calibration", {})),
                summary=dict(data.get("summary", {})),
                schema_version=version,
                dit_sparse_version=str(data.get("dit_sparse_version", "unknown")),
            )
        except ProfileError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProfileError(f"{source}: malformed profile ({type(exc).__name__}: {exc})") from None
        try:
            prof.validate()
        except ProfileError as exc:
            raise ProfileError(f"{source}: {exc}") from None
        return prof

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        """Read and validate a profile JSON file (clear :class:`ProfileError` on any problem)."""
        p = Path(path)
        if not p.is_file():
            raise ProfileError(f"profile file not found: {p}")
        size = p.stat().st_size
        if size > MAX_PROFILE_BYTES:
            raise ProfileError(
                f"{p}: {size} bytes is larger than the {MAX_PROFILE_BYTES}-byte limit for a profile"
            )
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"{p}: not valid JSON ({exc}); the file is corrupt or not a profile") from None
        return cls.from_dict(data, source=str(p))

    @classmethod
    def loads(cls, text: str | bytes, source: str = "profile") -> Profile:
        if len(text) > MAX_PROFILE_BYTES:
            raise ProfileError(f"{source}: larger than the {MAX_PROFILE_BYTES}-byte limit for a profile")
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=source)

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write atomically (temp file + rename). Refuses to replace an existing file unless ``overwrite``."""
        self.validate()
        p = Path(path)
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass overwrite=True (CLI: --force) to replace it")
        p.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"
        atomic_write_text(p, text)
        return p

    def stamp(self, **calibration: Any) -> None:
        """Record provenance (date, dit-sparse version) plus the given calibration fields."""
        self.calibration.update(calibration)
        self.calibration.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        self.dit_sparse_version = __version__


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _head_to_dict(spec: HeadSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"pattern": spec.pattern}
    if spec.params:
        d["params"] = spec.params
    if spec.density is not None:
        d["density"] = spec.density
    if spec.rel_error is not None:
        d["rel_error"] = spec.rel_error
    return d


def _head_from_dict(d: Any) -> HeadSpec:
    if isinstance(d, str):
        return HeadSpec(d)
    if not isinstance(d, dict) or "pattern" not in d:
        raise ProfileError(f"a head entry must be an object with a 'pattern', got {d!r}")
    unknown = set(d) - {"pattern", "params", "density", "rel_error"}
    if unknown:
        raise ProfileError(f"unknown head field(s) {sorted(unknown)} in {d!r}")
    params = d.get("params", {})
    if not isinstance(params, dict):
        raise ProfileError(f"head 'params' must be an object, got {params!r}")
    return HeadSpec(str(d["pattern"]), dict(params), d.get("density"), d.get("rel_error"))
