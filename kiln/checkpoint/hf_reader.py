"""Reading Hugging Face checkpoints one tensor at a time: single-file and sharded safetensors, and pytorch_model*.bin
loaded with `weights_only=True` and memory-mapped (never unpickled, never the whole model in memory)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kiln.checkpoint.safety import contained_file, resolved_inside


class CheckpointError(ValueError):
    """A checkpoint kiln cannot read, with the file and what to do."""


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {what} {path}: {err}") from err
    except RecursionError as err:  # absurdly nested JSON
        raise CheckpointError(f"cannot read {what} {path}: nested too deeply") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object, not a {type(data).__name__}")
    return data


class HFCheckpoint:
    """The tensors of a Hugging Face model directory, opened lazily; `get` loads one tensor."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"--model_dir {self.dir} is not a directory")
        self.config = read_json(resolved_inside(self.dir, self.dir / "config.json", str(self.dir)), "config.json")
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        files = self._weight_files()
        for path in files:
            for name in self._names_in(path):
                self._file_of[name] = path

    def _weight_files(self) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = self.dir / index_name
            if index_path.is_file():
                weight_map = read_json(index_path, index_name).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"{index_path} has no weight_map")
                where = f"{index_path} weight_map"
                files = sorted({contained_file(self.dir, f, where) for f in weight_map.values()})
                missing = [str(f) for f in files if not f.is_file()]
                if missing:
                    raise CheckpointError(f"{index_name} names files that are missing: {', '.join(missing)}")
                return files
        files = sorted(self.dir.glob("*.safetensors")) or sorted(self.dir.glob("pytorch_model*.bin"))
        files = [resolved_inside(self.dir, f, str(self.dir)) for f in files]
        if not files:
            raise CheckpointError(
                f"no weights in {self.dir}: expected model.safetensors, model-*.safetensors with "
                "model.safetensors.index.json, or pytorch_model*.bin"
            )
        return files

    def _open(self, path: Path) -> Any:
        if path not in self._handles:
            try:
                if path.suffix == ".safetensors":
                    self._handles[path] = safe_open(str(path), framework="pt")
                else:
                    self._handles[path] = _load_bin(path)
            except CheckpointError:
                raise
            except Exception as err:  # safetensors and torch raise many types for a damaged file
                raise CheckpointError(f"cannot read weight file {path}: {err}") from err
        return self._handles[path]

    def _names_in(self, path: Path) -> list[str]:
        handle = self._open(path)
        return list(handle.keys())

    def names(self) -> set[str]:
        return set(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
        path = self._file_of[name]
        handle = self._open(path)
        try:
            return handle.get_tensor(name) if path.suffix == ".safetensors" else handle[name]
        except Exception as err:
            raise CheckpointError(f"cannot read tensor {name!r} from {path}: {err}") from err


class _BinFile(dict):
    """A pytorch_model.bin's state dict, memory-mapped so that tensors are read from disk only when used."""

    def get_tensor(self, name: str) -> torch.Tensor:
        return self[name]


def _load_bin(path: Path) -> _BinFile:
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise CheckpointError(f"cannot read {path} (weights_only load): {err}") from err
            # Files in torch's legacy (pre-zip) format cannot be memory-mapped; they load whole, still without pickle.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message suggests weights_only=False, which would run the file's code: say what kiln does.
        raise CheckpointError(f"{path} holds Python objects besides tensors; kiln never unpickles, so it cannot read "
                              "this file: convert it to safetensors with a tool you trust") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return _BinFile(state)
