"""Training-time changes to the text conditioning: guidance dropout and the paper's mitigations.

Each acts on the text embedding c [B, L, D] (the text encoder's output) or on the batch's
per-sample losses, combines with the ambient objective (which changes only the image side),
and is the identity when its option is 0 -- exactly, not approximately, so an experiment
with a mitigation off reproduces one without it:

    CaptionDropout(p)              c_i -> c(""), the empty caption's embedding, with probability
                                   p: the model also learns the unconditional prediction that
                                   classifier-free guidance needs at sampling time.
    TextEmbeddingNoise(std)        c -> c + std * n, fresh n every step (paper Table 3, "noise
                                   in the text embedding"): the model cannot key an image on
                                   the exact embedding of its caption.
    PredictionMagnitudeFilter(th)  drops (from the loss) samples whose text-conditional part of
                                   the prediction is large, ||eps(z_t, c) - eps(z_t, c(""))||_2 > th
                                   (L2 over the whole latent, in epsilon units): a large value
                                   marks a caption the model is memorizing (Wen et al. 2024).

All random draws use the generator the caller passes (the trainer's saved noise generator),
so a resumed run draws the same dropout and noise.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ambient_dist.noise import ddpm_alpha_sigma
from ambient_dist.noise import draw_normal

# F(z_t [B, 4, h, w], t [B], c [B, L, D]) -> the U-Net's prediction (v or epsilon)
Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CaptionDropout:
    def __init__(self, probability: float):
        if not 0 <= probability < 1:
            raise ValueError(f"text.caption_dropout must be in [0, 1), got {probability}")
        self.probability = probability

    def __call__(self, cond: torch.Tensor, empty: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditioning with dropped rows replaced by `empty` [1, L, D], dropped bool [B])."""
        if self.probability == 0:
            return cond, torch.zeros(cond.shape[0], dtype=torch.bool, device=cond.device)
        where = generator.device if generator is not None else cond.device
        dropped = (torch.rand(cond.shape[0], generator=generator, device=where) < self.probability).to(cond.device)
        return torch.where(dropped[:, None, None], empty.to(cond).expand_as(cond), cond), dropped


class TextEmbeddingNoise:
    def __init__(self, std: float):
        if std < 0:
            raise ValueError(f"text.text_noise_std must be >= 0, got {std}")
        self.std = std

    def __call__(self, cond: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.std == 0:
            return cond
        return cond + self.std * draw_normal(cond.shape, generator, cond.device).to(cond.dtype)


class PredictionMagnitudeFilter:
    """Wraps the network so that each call also decides which samples stay in the loss.

    The filter needs the very z_t and t the loss feeds the network, which only exist inside
    the loss; wrapping the network is how it sees them without a second noise draw.
    """

    def __init__(self, threshold: float, prediction: str):
        if threshold < 0:
            raise ValueError(f"text.drop_threshold must be >= 0 (0 = off), got {threshold}")
        if prediction not in ("v", "epsilon"):
            raise ValueError(f"text.prediction must be 'v' or 'epsilon', got {prediction!r}")
        self.threshold, self.prediction = threshold, prediction

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    @torch.no_grad()
    def magnitude(self, network: Network, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                  empty: torch.Tensor, conditional_out: torch.Tensor) -> torch.Tensor:
        """||eps(z_t, c) - eps(z_t, empty)||_2 per sample [B] (float32)."""
        unconditional = network(z_t, t, empty.to(cond).expand_as(cond))
        diff = conditional_out.detach().float() - unconditional.float()
        if self.prediction == "v":
            # eps = s_t z_t + alpha_t v, so the difference of two eps is alpha_t times that of v.
            alpha_t, _ = ddpm_alpha_sigma(t.long())
            diff = diff * alpha_t.float().reshape(-1, *([1] * (diff.ndim - 1)))
        return diff.flatten(1).norm(dim=1)

    def wrap(self, network: Network, empty: torch.Tensor) -> tuple[Network, dict]:
        """(network that records the keep mask, record {"keep": bool [B], "magnitude": [B]})."""
        record: dict = {}

        def filtered(z_t, t, cond):
            out = network(z_t, t, cond)
            if self.enabled:
                m = self.magnitude(network, z_t, t, cond, empty, out)
                record["magnitude"], record["keep"] = m, m <= self.threshold
            return out
        return filtered, record
