"""Saving nested training state without pickles: tensors go to a safetensors
file, everything else (numbers, strings, lists, dicts) to a JSON file that
points at them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def save(stem: str | Path, state: Any) -> None:
    """Write `state` as `stem.safetensors` + `stem.json`, each replaced atomically."""
    stem = Path(stem)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, "s")
    atomic_write(stem.with_suffix(".safetensors"), lambda p: save_file(tensors, p))
    atomic_write(stem.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(skeleton)))


def load(stem: str | Path) -> Any:
    stem = Path(stem)
    tensors = load_file(stem.with_suffix(".safetensors"))
    return _decode(json.loads(stem.with_suffix(".json").read_text()), tensors)


def exists(stem: str | Path) -> bool:
    stem = Path(stem)
    return stem.with_suffix(".safetensors").exists() and stem.with_suffix(".json").exists()


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """`write(temporary path)`, then move the file into place in one step."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__items__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    return obj


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict):
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj
