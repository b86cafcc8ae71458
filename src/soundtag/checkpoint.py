"""Saving nested training state without pickles, as one file: tensors go into
a safetensors file, everything else (numbers, strings, lists, dicts) into its
metadata as JSON that points at them. The file is replaced in one step, so a
kill leaves either the old state or the new one, never a mix."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import SoundtagError


class CheckpointError(SoundtagError):
    """A checkpoint file that cannot be read back."""


def save(path: str | Path, state: Any) -> None:
    """Write `state` to `path` (a .safetensors file) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, "s")
    atomic_write(Path(path), lambda p: save_file(tensors, p, metadata={"state": json.dumps(skeleton)}))


def load(path: str | Path) -> Any:
    """The state saved by `save`; a damaged file raises CheckpointError."""
    try:
        with safe_open(str(path), "pt") as f:
            skeleton = json.loads((f.metadata() or {})["state"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint ({e}); delete it to restart this fold "
                              "from scratch") from None
    return _decode(skeleton, tensors)


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
