"""Build checkpoints: learnable tensors, optimiser states and every RNG state, in one safetensors file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from builders.errors import CheckpointError
from condensed_datasets._atomic import atomic_write_bytes
from condensed_datasets.format import read_safetensors_metadata

CHECKPOINT_KEY = "condensed_datasets_checkpoint"
CHECKPOINT_VERSION = 1


def _optimizer_to_flat(name: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Move an optimiser's tensors into ``tensors``; return the rest as JSON."""
    sd = opt.state_dict()
    state_json: dict[str, dict[str, Any]] = {}
    for idx, entries in sd["state"].items():
        plain: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{idx}.{key}"] = value.detach().cpu().contiguous()
                plain[key] = {"tensor": True}
            else:
                plain[key] = value
        state_json[str(idx)] = plain
    return {"state": state_json, "param_groups": sd["param_groups"]}


def _optimizer_from_flat(name: str, flat: dict[str, Any], tensors: dict[str, torch.Tensor], device) -> dict:
    state = {}
    for idx, entries in flat["state"].items():
        restored = {}
        for key, value in entries.items():
            if isinstance(value, dict) and value.get("tensor"):
                t = tensors[f"optim.{name}.{idx}.{key}"]
                restored[key] = t if key == "step" else t.to(device)
            else:
                restored[key] = value
        state[int(idx)] = restored
    return {"state": state, "param_groups": flat["param_groups"]}


def save_checkpoint(
    path: str | os.PathLike,
    *,
    iteration: int,
    state: dict[str, torch.Tensor],
    optimizers: dict[str, torch.optim.Optimizer],
    generator: torch.Generator,
    recipe: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a resumable checkpoint taken after ``iteration`` iterations."""
    tensors: dict[str, torch.Tensor] = {
        f"state.{k}": v.detach().cpu().contiguous() for k, v in state.items()
    }
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {
        "version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "recipe": recipe,
        "optimizers": {n: _optimizer_to_flat(n, o, tensors) for n, o in optimizers.items()},
        "extra": extra or {},
    }
    data = st_save(tensors, metadata={CHECKPOINT_KEY: json.dumps(meta, sort_keys=True)})
    return atomic_write_bytes(path, data)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a checkpoint; CheckpointError if it is not one."""
    path = Path(path)
    data = path.read_bytes()
    try:
        raw = read_safetensors_metadata(data, str(path)).get(CHECKPOINT_KEY)
        tensors = st_load(data)
    except Exception as exc:  # framing errors and safetensors' own error types
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc}); delete it to start over") from exc
    if raw is None:
        raise CheckpointError(f"{path}: not a condensed-datasets checkpoint")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint header ({exc}); delete it to start over") from None
    if not isinstance(meta, dict) or meta.get("version") != CHECKPOINT_VERSION:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: checkpoint version {version!r} is not {CHECKPOINT_VERSION}")
    problem = _header_problem(meta)
    if problem:
        raise CheckpointError(f"{path}: damaged checkpoint header ({problem}); delete it to start over")
    return meta, tensors


def _header_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint header's shape (None: nothing)."""
    iteration = meta.get("iteration")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        return f"iteration {iteration!r} is not an integer >= 0"
    if not isinstance(meta.get("recipe"), dict):
        return "no recipe mapping"
    optimizers = meta.get("optimizers")
    if not isinstance(optimizers, dict) or not all(
            isinstance(o, dict) and isinstance(o.get("state"), dict) and isinstance(o.get("param_groups"), list)
            for o in optimizers.values()):
        return "no optimiser states"
    return None


def restore_checkpoint(
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    state: dict[str, torch.Tensor],
    optimizers: dict[str, torch.optim.Optimizer],
    generator: torch.Generator,
) -> int:
    """Load a checkpoint into live state, optimisers and RNGs; returns the iteration to continue from."""
    with torch.no_grad():
        for key, value in state.items():
            saved = tensors.get(f"state.{key}")
            if saved is None or saved.shape != value.shape:
                raise CheckpointError(f"checkpoint has no compatible tensor for {key!r}")
            if saved.is_floating_point() and not torch.isfinite(saved).all():
                raise CheckpointError(f"checkpoint tensor {key!r} holds NaN or inf; delete it to start over")
            value.copy_(saved.to(value.device))
    if set(meta["optimizers"]) != set(optimizers):
        raise CheckpointError(f"checkpoint optimisers {sorted(meta['optimizers'])} != {sorted(optimizers)}")
    # a header or tensors that do not fit these optimisers and RNGs (hand-edited, or another version's)
    try:
        for name, opt in optimizers.items():
            device = opt.param_groups[0]["params"][0].device
            opt.load_state_dict(_optimizer_from_flat(name, meta["optimizers"][name], tensors, device))
            for group in opt.param_groups:
                for param in group["params"]:
                    for key, value in opt.state.get(param, {}).items():
                        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                            raise ValueError(f"optimiser {name!r} state {key!r} is {tuple(value.shape)}, "
                                             f"its tensor {tuple(param.shape)}")
        generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch_cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint does not fit this build ({type(exc).__name__}: {exc}); delete it to "
                              "start over") from exc
    return int(meta["iteration"])
