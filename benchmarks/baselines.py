"""Baselines the benchmarks compare against, written plainly and kept apart from our code path.

`PlainTrainingStep` is one optimizer step the way EDM's training loop takes it by default:
fp32 weights and arithmetic, eager PyTorch, TF32 off, `torch.optim.Adam` as constructed by
default (no fused kernel), every gradient passed through `nan_to_num` parameter by parameter,
and an EMA updated with one `lerp` per parameter. The loss is the spec's two-branch formula
written literally (`ambient_dist.objective.literal_edm_ambient_loss`, the same formula our
tests check the fast path against), so that baseline and ours do the same mathematics and only
the way it runs differs.

With `precision="bf16", compile=True` the same step runs under bf16 autocast with the
denoiser wrapped in `torch.compile`: the reference's "bf16 + compile" figure (1,820 img/s on
an H200 in the performance spec), i.e. what compile and autocast give WITHOUT our fused loss
kernels, fused optimizer, channels_last layout and step structure.

`plain_heun_sample` is EDM's deterministic sampler in its default numerics (fp32 network,
eager, no autocast), the baseline of sampling throughput.

Nothing here imports the trainer or our sampler: a baseline that called our own code path
would measure nothing.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

from ambient_dist.objective import literal_edm_ambient_loss


class PlainTrainingStep:
    """EDM's default training step for the ambient objective (see the module docstring)."""

    def __init__(self, net: torch.nn.Module, sigma_tn: float, lr: float = 1e-4,
                 precision: str = "fp32", compile: bool = False, P_mean: float = -1.2,
                 P_std: float = 1.2, ema_beta: float = 0.999):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"PlainTrainingStep: precision must be 'fp32' or 'bf16', got {precision!r}")
        self.net = net.train()
        self.denoiser = torch.compile(net) if compile else net
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
        self.sigma_tn, self.P_mean, self.P_std, self.ema_beta = sigma_tn, P_mean, P_std, ema_beta
        self.precision = precision

    def _autocast(self, device: torch.device):
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    def __call__(self, clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        batch = clean.shape[0]
        sigma = (torch.randn(batch, device=clean.device) * self.P_std + self.P_mean).exp()
        ambient = sigma >= self.sigma_tn
        eps = torch.randn_like(clean)
        with self._autocast(clean.device):
            per_sample = literal_edm_ambient_loss(self.denoiser, clean, noisy, sigma, ambient,
                                                  self.sigma_tn, eps)
        loss = per_sample.mean()                 # sum over pixels, mean over the batch
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.net.parameters():          # EDM's per-parameter gradient sanitising
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        self.optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.net.parameters()):
                p_ema.copy_(p.detach().lerp(p_ema, self.ema_beta))
        return loss.detach()


@torch.no_grad()
def plain_heun_sample(net: torch.nn.Module, noise: torch.Tensor, num_steps: int = 18,
                      sigma_min: float = 0.002, sigma_max: float = 80.0,
                      rho: float = 7.0) -> torch.Tensor:
    """EDM's deterministic Heun sampler as its generate script runs it by default: fp32
    network, eager, float64 state, one batch of standard-normal `noise`. 2 * num_steps - 1
    network evaluations (35 at 18 steps). The noise schedule is the project's (the same
    formula; it is not where time goes)."""
    from ambient_dist.sampling import edm_sigma_steps
    sigmas = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).tolist()
    x = noise.double() * sigmas[0]
    for i, (s_cur, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        slope = (x - net(x.float(), s_cur).double()) / s_cur
        x_next = x + (s_next - s_cur) * slope
        if i < num_steps - 1:      # second-order correction, except on the step to sigma 0
            slope_next = (x_next - net(x_next.float(), s_next).double()) / s_next
            x_next = x + (s_next - s_cur) * 0.5 * (slope + slope_next)
        x = x_next
    return x.float()
