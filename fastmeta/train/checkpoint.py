"""Checkpoints: written atomically (a crash never loses the last good one), read with errors that say what is
wrong, and loaded into a run's model, learned modules and optimiser."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "load_states"]


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a crash mid-write
    leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, AttributeError, ImportError) as e:
        # torch.load's own words for a truncated zip ("Invalid argument") or a foreign pickle say nothing useful
        raise ValueError(
            f"{path} is not a readable fastmeta checkpoint ({type(e).__name__}: {e}): truncated, corrupt or not "
            "written by fastmeta train; a run folder's other checkpoint (checkpoint.pt or best.pt) may be intact"
        ) from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{path} is not a fastmeta checkpoint (no config and model state)")
    return state


def load_states(state: dict, model: nn.Module, aux: nn.Module | None, opt, path: Path) -> None:  # noqa: ANN001
    """Loads a checkpoint's `state` into `model`, `aux` (the learner's second module) and `opt` (None: not
    restored); ValueError naming `path` if it holds another model."""
    try:
        model.load_state_dict(state["model"])
        if aux is not None:
            aux.load_state_dict(state["aux"] if "aux" in state else state["inner_lr"])
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"{path} holds a different model ({state.get('model_config')}) than this run builds: {e}"
        ) from None
    if opt is not None:
        opt.load_state_dict(state["optimizer"])
