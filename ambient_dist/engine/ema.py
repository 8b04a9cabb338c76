"""Exponential moving average of the weights, with EDM's semantics.

The averaging horizon is a half-life counted in images, not steps, so the same setting means
the same thing at any batch size:  beta = 0.5 ** (batch / halflife_images).  Early in
training the half-life is capped at `rampup_ratio * images_seen`, so the average does not
drag the random initial weights along for millions of images (EDM's ema_rampup_ratio).

`EMA` keeps its own float32 copies of a set of named tensors. It does not care whether they
are a whole network's parameters (plain PyTorch) or the slice of them one rank owns (ZeRO):
the caller passes the matching live tensors to `update`, which lets each rank average only
its own partition without gathering the full model.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch


def ema_beta(images_seen: int, batch: int, halflife_kimg: float, rampup_ratio: float) -> float:
    """Decay factor of one update after a step of `batch` images (images_seen before it)."""
    halflife_images = halflife_kimg * 1000
    if rampup_ratio > 0:
        halflife_images = min(halflife_images, images_seen * rampup_ratio)
    # A zero half-life means "track the live weights exactly" (beta = 0).
    return 0.5 ** (batch / max(halflife_images, 1e-8))


class EMA:
    """float32 moving averages of named tensors; non-float tensors are copied verbatim."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.shadow: dict[str, torch.Tensor] = {
            name: self._stored(t) for name, t in tensors.items()}

    @classmethod
    def of_module(cls, module: torch.nn.Module) -> "EMA":
        return cls(module.state_dict())

    @staticmethod
    def _stored(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        # Average in float32 even when the live weights are bf16: a 0.999 decay on a bf16
        # value would round away every update.
        return t.float().clone() if t.is_floating_point() else t.clone()

    @torch.no_grad()
    def update(self, live: Mapping[str, torch.Tensor], beta: float) -> None:
        """shadow = beta * shadow + (1 - beta) * live, for every tensor the EMA holds."""
        for name, avg in self.shadow.items():
            current = live[name].detach()
            if avg.is_floating_point():
                avg.lerp_(current.to(avg.dtype), 1.0 - beta)
            else:
                avg.copy_(current)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        unexpected = set(state) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        for name, avg in self.shadow.items():
            avg.copy_(state[name])

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the averaged weights into `module` (e.g. a network used for sampling)."""
        module.load_state_dict({k: v for k, v in self.shadow.items()}, strict=True)

    def names(self) -> Iterable[str]:
        return self.shadow.keys()
