"""``last.pt`` and ``best.pt``: what they hold, writing them safely, and reading ``last.pt`` back
so that a resumed run continues exactly where the first one stopped.

``last.pt`` is written at the end of every epoch. It holds the model, optimiser, scheduler and
gradient-scaler states, the epoch count, the metrics history, the run's settings, and every
random state the next epoch draws from: torch's global generator (and CUDA's), Python's
``random``, NumPy's global generator, and the run's own generators (the data shuffler and the
augmentation). Restoring them all makes epoch ``k + 1`` of a resumed run draw exactly what it
would have drawn in one straight run.

``best.pt`` holds the weights of the epoch with the best test accuracy under ``"model"``, so
``fastdl.models.load_checkpoint(model, "best.pt")`` reads it.

Both files load with ``torch.load(weights_only=True)``: they hold only tensors and plain values.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import RECIPE_FIELDS, ConfigError, TrainConfig

__all__ = ["FORMAT", "rng_state", "restore_rng_state", "save", "load_last", "check_same_recipe"]

FORMAT = "fastdl.train/1"


def write_json(content: dict, path: Path) -> None:
    """Write ``content`` to ``path`` through a temporary file, so a reader never sees half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(content, indent=1))
    os.replace(partial, path)


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Every random state a training epoch may draw from, as tensors and plain values."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "generators": {key: generator.get_state() for key, generator in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    """Put back what :func:`rng_state` captured (``generators`` are set in place)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["name"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    missing = sorted(set(generators) - set(state["generators"]))
    if missing:
        raise ValueError(f"the checkpoint has no state for the generators {missing}")
    for key, generator in generators.items():
        generator.set_state(state["generators"][key])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        for index in range(min(len(states), torch.cuda.device_count())):
            torch.cuda.set_rng_state(states[index], index)


def save(content: dict, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file, so an interrupted write never leaves a torn file."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save(content, partial)
    os.replace(partial, path)


def load_last(out: str | os.PathLike, expected_format: str = FORMAT) -> dict:
    """``out/last.pt``, checked to be a training checkpoint of ``expected_format``."""
    path = Path(out) / "last.pt"
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"--resume: no checkpoint {str(path)!r}") from None
    except Exception as error:  # torch.load raises several types for a damaged or foreign file
        raise ConfigError(f"--resume: {path} is not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(content, dict) or content.get("format") != expected_format:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise ConfigError(
            f"--resume: {path} is not a fastdl train checkpoint (format {found!r}, expected {expected_format!r})"
        )
    return content


def _flag(field: str) -> str:
    return "MODEL" if field == "model" else "--" + field.replace("_", "-")


_MAY_CHANGE = "--epochs, --patience, --device, --compile, --amp, --workers, --channels-last and --no-progress"


def check_same_recipe(
    saved: dict, config: TrainConfig, path: str, fields: tuple[str, ...] = RECIPE_FIELDS, may_change: str = _MAY_CHANGE
) -> None:
    """Refuse to resume with settings that change the trajectory: ``fields`` of ``config`` (any
    object with ``to_dict()``; :data:`RECIPE_FIELDS` of a :class:`TrainConfig` by default) that
    differ from the ``saved`` settings. ``may_change`` lists, for the message, the flags that may."""
    current = config.to_dict()
    changed = [
        f"{_flag(field)} {saved.get(field)!r} -> {current[field]!r}"
        for field in fields
        if saved.get(field) != current[field]
    ]
    if changed:
        raise ConfigError(
            f"--resume: {path} was trained with other settings ({'; '.join(changed)}); an exact continuation needs "
            f"the same ones (only {may_change} may change)"
        )
