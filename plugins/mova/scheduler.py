"""MOVA's sampling schedule as the official OpenMOSS code runs it (plugins/mova/README.md, "Sampler").

The official pipeline (``mova/diffusion/pipelines/pipeline_mova.py``) samples with its
``FlowMatchPairScheduler`` (``mova/diffusion/schedulers/flow_match_pair.py`` on top of
``flow_match.py``), configured by the checkpoint's ``scheduler/scheduler_config.json``:

* the inference grid: ``s = linspace(σ_max, σ_min, N + 1)[:-1]`` (``extra_one_step``; else
  ``linspace(σ_max, σ_min, N)``), ``σ = shift·s / (1 + (shift − 1)·s)``, timesteps ``t = 1000·σ``,
  everything in float32 torch arithmetic, with the **config's** shift (the call's ``sigma_shift``
  argument is ignored);
* the DiT receives those timesteps ``t_k``; the video tower switches to the low-noise expert once
  ``t_k < boundary · 1000`` (``t_k`` float32, the product a Python float);
* each Euler step ``x ← x + v·(σ(t_{k+1}) − σ(t_k))`` looks both σ up on the 1000-point training
  grid built when the scheduler is created (the same formula at N = 1000, the same shift):
  ``σ(t) = train_sigmas[argmin |train_timesteps − t|]`` (the first of equal distances); the last
  target is 0.

So the σ of the Euler steps are **snapped** to the training grid and differ from ``t_k / 1000``
unless N divides 1000 (30 steps at shift 5: up to 2.3e-3 per step size; 60 steps at shift 8:
3.9e-3). :class:`MovaScheduler` reproduces this bit for bit (``tests/mova/test_scheduler.py``
compares it with a port of the official code).
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

__all__ = ["MovaScheduler", "RELEASED_SCHEDULER", "read_scheduler_config"]

_UNSUPPORTED = {"inverse_timesteps": False, "reverse_sigmas": False, "exponential_shift": False, "shift_terminal": None}
"""Options of the official scheduler that the released config leaves at these values; ditkit
implements only these (another value is refused by :func:`read_scheduler_config`)."""


@dataclass(frozen=True)
class MovaScheduler:
    """The released ``scheduler/scheduler_config.json`` of MOVA-360p / MOVA-720p (its defaults) and the
    schedule it produces. ``sigma_max`` is the grid's start at full denoising strength (1.0)."""

    num_train_timesteps: int = 1000
    shift: float = 5.0
    sigma_max: float = 1.0
    sigma_min: float = 0.0
    extra_one_step: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise ValueError(f"MOVA scheduler: num_train_timesteps must be a positive integer, got {self.num_train_timesteps!r}")
        if not self.shift > 0:
            raise ValueError(f"MOVA scheduler: shift must be > 0, got {self.shift!r}")

    def _grid(self, steps: int) -> torch.Tensor:
        """σ of an ``steps``-point grid, float32, with the official arithmetic (float32 torch ops)."""
        start = self.sigma_min + (self.sigma_max - self.sigma_min) * 1.0  # denoising strength 1
        if self.extra_one_step:
            s = torch.linspace(start, self.sigma_min, steps + 1, dtype=torch.float32)[:-1]
        else:
            s = torch.linspace(start, self.sigma_min, steps, dtype=torch.float32)
        return self.shift * s / (1 + (self.shift - 1) * s)

    @functools.cached_property
    def _train(self) -> tuple[torch.Tensor, torch.Tensor]:
        sigmas = self._grid(self.num_train_timesteps)
        return sigmas * self.num_train_timesteps, sigmas

    def timesteps(self, steps: int) -> torch.Tensor:
        """The ``steps`` timesteps the DiT receives, float32 (``1000·σ`` of the inference grid)."""
        return self._grid(steps) * self.num_train_timesteps

    def snap(self, timesteps: torch.Tensor) -> torch.Tensor:
        """σ of the training-grid point nearest to each timestep (the first of equal distances)."""
        train_t, train_sigma = self._train
        index = (train_t[None, :] - timesteps.float().reshape(-1, 1)).abs().argmin(dim=1)
        return train_sigma[index]

    def sigmas(self, steps: int) -> torch.Tensor:
        """The ``steps + 1`` σ the Euler steps move between: the snapped σ of each timestep, then 0."""
        return torch.cat([self.snap(self.timesteps(steps)), torch.zeros(1)])

    def is_high_noise(self, timestep: torch.Tensor | float, boundary: float) -> bool:
        """Official rule: the high-noise video expert runs while the (float32) timestep is at least
        ``boundary · num_train_timesteps``."""
        return not float(timestep) < boundary * self.num_train_timesteps

    def to_json_dict(self) -> dict:
        """The ``scheduler_config.json`` of the release (class ``FlowMatchPairScheduler``)."""
        return {"_class_name": "FlowMatchPairScheduler", **asdict(self), **_UNSUPPORTED}


RELEASED_SCHEDULER = MovaScheduler()
"""shift 5.0, σ_min 0.0, ``extra_one_step`` true: the released ``scheduler/scheduler_config.json``
(docs/models.md, MOVA sampler)."""


def read_scheduler_config(path: str | Path) -> MovaScheduler:
    """The :class:`MovaScheduler` of a ``scheduler_config.json``. Keys the official class takes but
    sampling does not read (``num_inference_steps``, ``_class_name``, ...) are ignored; an option
    ditkit does not implement set to another value than the release's is a ``WeightsError`` naming it."""
    from core.errors import WeightsError

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read the MOVA scheduler config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{path} holds {type(data).__name__}, expected a JSON object")
    for key, value in _UNSUPPORTED.items():
        if data.get(key, value) != value:
            raise WeightsError(f"{path}: {key}={data[key]!r} is not implemented (ditkit samples MOVA with {key}={value!r}, "
                               f"as the released checkpoints do)")
    names = {f.name for f in fields(MovaScheduler)}
    try:
        return MovaScheduler(**{k: v for k, v in data.items() if k in names})
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: {exc}") from exc
