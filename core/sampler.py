"""Flow-matching sampling shared by every plugin (docs/models.md, sampling, Wan pipeline).

The model predicts a velocity v ≈ ε − x₀; an Euler step moves x from σ_k to σ_{k+1}.
"""
from __future__ import annotations

import math

import torch

__all__ = ["shifted_sigmas", "dynamic_shift_sigmas", "euler_step", "guide", "noise"]


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        from .errors import InputError

        raise InputError(f"steps must be a positive integer, got {steps!r}")


def shifted_sigmas(steps: int, shift: float = 1.0, s_max: float = 1.0) -> torch.Tensor:
    """σ_k = shift·s_k / (1 + (shift−1)·s_k), s = linspace(s_max, 0, N+1)[:-1], then a final 0.

    Returns ``steps + 1`` float32 values (Wan, MOVA; ``s_max=0.999`` is official Wan UniPC's grid).
    """
    _check_steps(steps)
    s = torch.linspace(s_max, 0.0, steps + 1, dtype=torch.float64)[:-1]
    sigma = shift * s / (1.0 + (shift - 1.0) * s)
    return torch.cat([sigma, sigma.new_zeros(1)]).float()


def dynamic_shift_sigmas(
    steps: int,
    image_seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 8192,
    base_shift: float = 0.5,
    max_shift: float = 0.9,
    shift_terminal: float | None = 0.02,
    mu: float | None = None,
) -> torch.Tensor:
    """Qwen-Image's resolution-dependent exponential shift with terminal stretch (docs/models.md, sampling)."""
    _check_steps(steps)
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    if mu is None:
        mu = base_shift + (image_seq_len - base_seq_len) * (max_shift - base_shift) / (max_seq_len - base_seq_len)
    sigma = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    if shift_terminal is not None and steps > 1:
        # the stretch maps the last σ onto shift_terminal; with one step that σ is 1 (0/0), and
        # the single step simply goes from 1 to 0
        sigma = 1.0 - (1.0 - sigma) * (1.0 - shift_terminal) / (1.0 - sigma[-1])
    return torch.cat([sigma, sigma.new_zeros(1)]).float()


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x ← x + (σ_{k+1} − σ_k)·v, computed in float32 and cast back to ``x``'s dtype."""
    return (x.float() + (float(sigma_next) - float(sigma)) * v.float()).to(x.dtype)


def guide(v_pos: torch.Tensor, v_neg: torch.Tensor, scale: float, rescale_dim: int | None = None) -> torch.Tensor:
    """Classifier-free guidance v = v_neg + s·(v_pos − v_neg).

    With ``rescale_dim`` the result is rescaled to v_pos's norm over that dimension (Qwen-Image's
    "true CFG", docs/models.md, sampling).
    """
    v = v_neg + scale * (v_pos - v_neg)
    if rescale_dim is not None:
        v = v * (v_pos.norm(dim=rescale_dim, keepdim=True) / v.norm(dim=rescale_dim, keepdim=True))
    return v


def noise(shape, seed: int, *, device=None, dtype=torch.float32, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise that is identical on every device: drawn on the CPU, then moved.

    ``generator`` (a CPU ``torch.Generator``) is drawn from, advancing its state, instead of a
    fresh one seeded with ``seed``."""
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return x.to(device=device, dtype=dtype)
