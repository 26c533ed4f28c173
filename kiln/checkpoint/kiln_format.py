"""Reading kiln's own checkpoint and engine directories, and checking their rank files against the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from kiln.checkpoint.hf_reader import CheckpointError, read_json
from kiln.config import FORMAT_VERSION, BuildConfig, Mapping, ModelConfig, QuantConfig, dataclass_from_dict
from kiln.models import family_by_name
from kiln.runtime_checks import check_rank_header
from kiln.models.family import Family


# config.json's record of dummy weights that are never written: each rank draws its own when it loads
# (kiln.checkpoint.in_memory); such a checkpoint or engine has no rank files.
IN_MEMORY_KEY = "weights_in_memory"


@dataclass
class ArtifactInfo:
    """A kiln checkpoint or engine directory, its parsed configs and the raw config.json."""

    path: Path
    kind: str
    model: ModelConfig
    mapping: Mapping
    quant: QuantConfig
    family: Family
    raw: dict[str, Any]

    @property
    def build(self) -> BuildConfig:
        build = dataclass_from_dict(BuildConfig, self.raw.get("build"), "engine build config")
        build.validate(self.model)  # an edited engine (block size 0, limits past the model's) is refused here
        return build

    @property
    def weights_in_memory(self) -> dict[str, Any] | None:
        """The dummy source the ranks draw their weights from (no rank files), or None for weights on disk."""
        record = self.raw.get(IN_MEMORY_KEY)
        if record is not None and not isinstance(record, dict):
            raise CheckpointError(f"{self.path}/config.json: {IN_MEMORY_KEY} must be an object (the dummy weights' "
                                  "seed, std and device); rebuild the engine")
        return record

    def rank_file(self, rank: int) -> Path:
        return self.path / f"rank{rank}.safetensors"


def load_artifact(path: str | Path, kind: str) -> ArtifactInfo:
    """Open a kiln directory of the given kind ("checkpoint" or "engine"), with clear errors for anything else."""
    path = Path(path)
    flag = "--checkpoint_dir" if kind == "checkpoint" else "--engine_dir"
    if not path.is_dir():
        raise CheckpointError(f"{flag} {path} is not a directory")
    raw = read_json(path / "config.json", f"kiln {kind} config.json")
    version = raw.get("kiln_format_version")
    if version is None:
        hint = "run `kiln convert` first" if kind == "checkpoint" else "run `kiln build` on a kiln checkpoint first"
        raise CheckpointError(f"{path} is not a kiln {kind} (no kiln_format_version in config.json); {hint}")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has kiln format version {version}, this kiln reads version {FORMAT_VERSION}; "
            f"re-run convert and build with this kiln"
        )
    if raw.get("kind") != kind:
        raise CheckpointError(f"{path} is a kiln {raw.get('kind')}, but {flag} needs a kiln {kind}")
    if kind == "engine":
        for section in ("build", "memory_plan"):
            if not isinstance(raw.get(section), dict):
                raise CheckpointError(f"{path} is an engine without its {section} section in config.json; rebuild it "
                                      "with `kiln build`")
    model = ModelConfig.from_dict(raw)
    mapping = dataclass_from_dict(Mapping, raw.get("mapping"), "mapping")
    quant = dataclass_from_dict(QuantConfig, raw.get("quantization"), "quantization")
    return ArtifactInfo(path, kind, model, mapping, quant, family_by_name(model.family), raw)


def check_rank_file(info: ArtifactInfo, rank: int, params: dict[str, Any]) -> int:
    """Compare a rank file's header with the parameters the model expects; return its tensor bytes."""
    path = info.rank_file(rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint should have one file per rank (world_size "
                              f"{info.mapping.world_size})")
    check_rank_header(str(path), rank, info.model.torch_dtype, info.quant.quant_algo is not None,
                      info.quant.act_order)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    missing = sorted(set(params) - set(shapes))
    extra = sorted(set(shapes) - set(params))
    if missing or extra:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:6]}, unexpected {extra[:6]}")
    total = 0
    for name, param in params.items():
        if shapes[name] != tuple(param.shape):
            raise CheckpointError(f"{path}: {name} has shape {shapes[name]}, the model expects {tuple(param.shape)}")
        total += param.numel() * param.element_size()
    return total
