"""The ambient training objective (Algorithm 1 of the shared spec, objective.md sections 2-4).

Below the noise level sigma_tn of the fixed noisy copies the model learns from clean images
as usual; above it, only from the one noisy copy x_tn of each image. The first section below
is the definition, the spec's two branches written literally; everything after it computes
the same numbers in a form that one network call and two fused passes can serve.

    1. The definition        literal_edm_ambient_loss (plain_edm_loss: its sigma_tn = 0 limit)
    2. The same, in the form the kernels take
                             StepCoefficients and one builder per form (EDM/VE, VP, latent v)
    3. The two-pass seam     TwoBranchKernel (pass 1 network input, pass 2 residual loss and
                             dF), its reference implementation REFERENCE, select_kernel
    4. The training distribution of noise levels and branches (sample_lognormal_sigma, ...)
    5. The loss classes      build_loss(cfg.objective) -> loss_fn(net, clean, noisy, ...)

The seam, and why its arrows point one way: this module defines the protocol and the plain
PyTorch implementation every other one is tested against. The fused implementations (Triton,
CUDA) live in the ambient_dist.kernels package, which imports this module (for the protocol,
the reference and the selection error), never the reverse at import time. `select_kernel`
returns an object; for a fused kind it imports ambient_dist.kernels inside the call, once,
and asks its `fused_kernel(kind, device)` factory for the object. After that the loss holds
the object and calls its methods: no string is dispatched again. A new implementation is a
subclass of TwoBranchKernel in ambient_dist.kernels plus a case in that factory
(docs/INTERFACES.md).
"""
from __future__ import annotations

import abc
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from ambient_dist.errors import UserError
from ambient_dist.noise import (DDPM_STEPS, check_image_range, ddpm_alpha_sigma, draw_normal,
                                draw_randint, draw_uniform, vp_alpha_sigma, vp_sigma, vp_t)

if TYPE_CHECKING:  # annotations only: the kernels import this module without the config's yaml
    from ambient_dist.config import ObjectiveConfig


# --------------------------------------------------------------------------------------
# 1. The definition: the spec's two branches (section 2), literally
# --------------------------------------------------------------------------------------

def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] to broadcast over one sample's elements."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def literal_edm_ambient_loss(net, x0: torch.Tensor, x_tn: torch.Tensor, sigma: torch.Tensor,
                             ambient: torch.Tensor, sigma_tn: float, eps: torch.Tensor,
                             labels=None) -> torch.Tensor:
    """The ambient loss, per sample [B] (float32), as the spec states it:

        clean   (sigma <  sigma_tn):  x_in = x0   + sigma * eps
                                      loss = lambda(sigma) || D(x_in; sigma) - x0 ||^2
        ambient (sigma >= sigma_tn):  x_in = x_tn + sqrt(sigma^2 - sigma_tn^2) * eps
                                      loss = lambda(sigma) || a D(x_in; sigma) + b x_in - x_tn ||^2
                                      a = (sigma^2 - sigma_tn^2) / sigma^2,  b = sigma_tn^2 / sigma^2

    Both are minimised by D = E[x0 | x_in], because E[x_tn | x_in] = a E[x0 | x_in] + b x_in.
    One network call serves the mixed batch; sum over pixels, mean over the batch is the
    caller's. net(x, sigma, labels) is the preconditioned denoiser D with `sigma_data`;
    x0, x_tn, eps: [B, C, H, W]; sigma: [B]; ambient: bool [B]. Training computes the same
    numbers through StepCoefficients and a TwoBranchKernel (sections 2-3); the tests hold
    them to this function, and benchmarks/baselines.py trains with it as written.
    """
    s = _per_sample(sigma, x0)
    amb = _per_sample(ambient, x0)
    x_in = torch.where(amb, x_tn + (s ** 2 - sigma_tn ** 2).clamp(min=0).sqrt() * eps, x0 + s * eps)
    D = net(x_in, sigma, labels)
    a, b = (s ** 2 - sigma_tn ** 2) / s ** 2, sigma_tn ** 2 / s ** 2
    r = torch.where(amb, a * D + b * x_in - x_tn, D - x0)
    return edm_weight(sigma, net.sigma_data) * r.square().sum(dim=tuple(range(1, x0.ndim)))


def plain_edm_loss(net, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
                   labels=None) -> torch.Tensor:
    """Plain EDM per-sample loss [B]: lambda(sigma) ||D(x0 + sigma eps; sigma) - x0||^2, the
    objective the definition above must reproduce bit for bit at sigma_tn = 0 (every sample
    clean), given the same draws. Written on its own, as EDM states it, to be that check."""
    s = _per_sample(sigma, x0)
    D = net(x0 + s * eps, sigma, labels)
    return edm_weight(sigma, net.sigma_data) * (D - x0).square().sum(dim=tuple(range(1, x0.ndim)))


# --------------------------------------------------------------------------------------
# 2. The same, in the form the kernels take: per-sample coefficients of one generic form
# --------------------------------------------------------------------------------------

@dataclass
class StepCoefficients:
    """The definition, in the form the kernels take: per-sample coefficients of one step.

    Every form (EDM/VE, VP, latent v-prediction) reduces to

        src    = noisy copy if ambient else clean      x_in = P src + Q eps     net_in = c_in x_in
        F      = raw network(net_in, c_noise, labels)  (ONE call for the mixed batch)
        r      = A F + B x_in + C src                  loss_i = weight_i * sum(r^2)

    so that one pair of passes serves all of them. Every field is [B] (float32 but `ambient`,
    bool). `sigma` is the (VE-equivalent) noise level, for logging; `c_noise` what the network
    sees. For the EDM form, with D = c_skip x_in + c_out F: clean A = c_out, B = c_skip, C = -1
    is lambda || D - x0 ||^2; ambient A = a c_out, B = a c_skip + b, C = -1 is
    lambda || a D + b x_in - x_tn ||^2 (edm_coefficients).
    """
    P: torch.Tensor
    Q: torch.Tensor
    c_in: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    weight: torch.Tensor
    ambient: torch.Tensor
    sigma: torch.Tensor
    c_noise: torch.Tensor


def _ambient_ratios(sigma: torch.Tensor, sigma_tn: float):
    """(sqrt(sigma^2 - sigma_tn^2), a, b) in float64, then float32.

    Float64 because sigma^2 - sigma_tn^2 cancels just above sigma_tn; clamped at 0 because
    the float32 sigma may equal the rounded sigma_tn. a is only ever multiplied, never divided.
    """
    s2 = sigma.double() ** 2
    excess = (s2 - sigma_tn ** 2).clamp(min=0.0)
    return excess.sqrt().float(), (excess / s2).float(), (sigma_tn ** 2 / s2).float()


def edm_coefficients(precond, sigma: torch.Tensor, ambient: torch.Tensor, sigma_tn: float,
                     sigma_data: float) -> StepCoefficients:
    """Section 2, with the network's own preconditioning D = c_skip x + c_out F(c_in x, c_noise).

    clean:   P=1, Q=sigma,                  A=c_out,   B=c_skip,       C=-1
    ambient: P=1, Q=sqrt(sigma^2-sigma_tn^2), A=a c_out, B=a c_skip + b, C=-1
    (a D + b x_in - x_tn = a c_out F + (a c_skip + b) x_in - x_tn.)
    """
    c_skip, c_out, c_in, c_noise = precond.scalings(sigma)
    q, a, b = _ambient_ratios(sigma, sigma_tn)
    ones = torch.ones_like(sigma)
    return StepCoefficients(
        P=ones, Q=torch.where(ambient, q, sigma), c_in=c_in,
        A=torch.where(ambient, a * c_out, c_out),
        B=torch.where(ambient, a * c_skip + b, c_skip),
        C=-ones, weight=edm_weight(sigma, sigma_data),
        ambient=ambient, sigma=sigma, c_noise=c_noise)


def vp_coefficients(precond, sigma: torch.Tensor, ambient: torch.Tensor,
                    sigma_tn: float) -> StepCoefficients:
    """Section 3 (paper eq. 6), evaluated with the same VE-parameterised denoiser.

    The VP state is the VE state scaled: x_VP = alpha x_VE, alpha = 1/sqrt(1+sigma^2). So x_in
    here is the VE-scaled input x_VP / alpha and the network sees c_in x_in (for EDM's VP
    preconditioning c_in = alpha, i.e. exactly x_VP). The stored copy is x_tn = alpha_tn x_tn_VE,
    and the ambient input x_t = (alpha_t/alpha_tn) x_tn + s_{t|tn} eta becomes, divided by
    alpha_t, x_in = x_tn / alpha_tn + sqrt(sigma^2 - sigma_tn^2) eta: P = 1/alpha_tn.
    Eq. 6's residual, (s_t^2-s_tn^2)/(s_t^2 alpha_tn) D + (s_tn^2/s_t^2)(alpha_t/alpha_tn) x_t
    - x_tn, written in sigma, is alpha_tn (a D + b x_in) - x_tn, a and b as in section 2:
    A = alpha_tn a c_out, B = alpha_tn (a c_skip + b), C = -1. Weight 1/sigma^2 (EDM's VPLoss).
    """
    c_skip, c_out, c_in, c_noise = precond.scalings(sigma)
    q, a, b = _ambient_ratios(sigma, sigma_tn)
    alpha_tn = float(vp_alpha_sigma(sigma_tn)[0])
    ones = torch.ones_like(sigma)
    return StepCoefficients(
        P=torch.where(ambient, ones / alpha_tn, ones), Q=torch.where(ambient, q, sigma), c_in=c_in,
        A=torch.where(ambient, alpha_tn * a * c_out, c_out),
        B=torch.where(ambient, alpha_tn * (a * c_skip + b), c_skip),
        C=-ones, weight=1.0 / sigma ** 2,
        ambient=ambient, sigma=sigma, c_noise=c_noise)


def latent_v_coefficients(t: torch.Tensor, ambient: torch.Tensor, t_n: int,
                          loss_space: str) -> StepCoefficients:
    """Section 4: DDPM timesteps t (long [B]), a v-prediction network v(z_t, t, cond).

    clean:   z_t = alpha_t z0 + s_t eps                          (P=alpha_t, Q=s_t)
    ambient: z_t = (alpha_t/alpha_tn) z_tn + s_{t|tn} eta         (s_{t|tn}^2 = 1 - abar_t/abar_tn)
    The network sees z_t itself (c_in = 1) and c_noise = t. Its x0 estimate is
    z0_pred = alpha_t z_t - s_t v.

    loss_space "x0" (default): compare in the space of the branch's own data. Clean:
    r = z0_pred - z0. Ambient: map z0_pred to the z_tn it implies, E[z_tn|z_t] =
    k1 E[z0|z_t] + k2 z_t with k1 = alpha_tn s_{t|tn}^2/s_t^2, k2 = alpha_t s_tn^2/(alpha_tn s_t^2),
    and r = k1 z0_pred + k2 z_t - z_tn. Weight 1/s_t^2 on both, so the clean branch is the usual
    v loss exactly. Nothing is divided by s_{t|tn}, which vanishes just above t_n.
    loss_space "v": the literal v target, r = v - v_hat with v_hat = (alpha_t z_t - z0_hat)/s_t
    and z0_hat = (z_tn - k2 z_t)/k1 (clean: v_target = alpha_t eps - s_t z0). This is the x0-space
    residual divided by -k1 s_t (-s_t when clean), weight 1: the 1/k1 is why v_hat is so noisy
    just above t_n.
    """
    alpha_t, s_t = ddpm_alpha_sigma(t)
    alpha_tn, s_tn = (float(v) for v in ddpm_alpha_sigma(t_n))
    s_cond2 = (1.0 - alpha_t ** 2 / alpha_tn ** 2).clamp(min=0.0)
    k1 = alpha_tn * s_cond2 / s_t ** 2
    k2 = alpha_t * s_tn ** 2 / (alpha_tn * s_t ** 2)
    A = torch.where(ambient, -k1 * s_t, -s_t)
    B = torch.where(ambient, k1 * alpha_t + k2, alpha_t)
    C = -torch.ones_like(alpha_t)
    weight = 1.0 / s_t ** 2
    if loss_space == "v":
        A, B, C, weight = torch.ones_like(A), B / A, C / A, torch.ones_like(weight)
    elif loss_space != "x0":
        raise ValueError(f"objective.latent_loss_space: unknown space {loss_space!r} (x0, v)")
    f32 = lambda v: v.float()  # noqa: E731  (schedule maths in float64, coefficients in float32)
    return StepCoefficients(
        P=f32(torch.where(ambient, alpha_t / alpha_tn, alpha_t)),
        Q=f32(torch.where(ambient, s_cond2.sqrt(), s_t)),
        c_in=torch.ones_like(f32(alpha_t)), A=f32(A), B=f32(B), C=f32(C), weight=f32(weight),
        ambient=ambient, sigma=f32(s_t / alpha_t), c_noise=t.float())



# --------------------------------------------------------------------------------------
# 3. The two-pass seam: the protocol, its reference implementation, the selection
# --------------------------------------------------------------------------------------

KERNEL_KINDS = ("auto", "reference", "triton", "cuda")


class KernelChoiceError(UserError):
    """objective.kernel names an implementation that does not exist or cannot run here."""


class TwoBranchKernel(abc.ABC):
    """The two passes around the ONE network call of a training step (section 2's form).

        pass 1  network_input: net_in = c_in (P src + Q eps), src chosen per sample
        (the caller runs F = network(net_in, c_noise, labels))
        pass 2  residual_loss: loss_i = weight_i sum((A F + B x_in + C src)^2), differentiable
                in F; an implementation may produce dF in the same pass (the fused ones do)

    Shapes: clean, noisy, eps, F, net_in are [B, ...] alike (images [B, C, H, W], latents);
    coefs fields are [B]. noisy may be None when no sample is ambient. eps is a tensor, or a
    counter-based noise request with a `.normal_like(like)` method (ambient_dist.kernels'
    PhiloxNoise), which the fused input pass draws in-kernel and the reference materialises.
    Arithmetic is float32 whatever the storage (float64 inputs: float64).

    Subclasses set `name` and implement the two passes; `loss` composes them.
    """

    name: str = ""

    @abc.abstractmethod
    def network_input(self, coefs: StepCoefficients, clean: torch.Tensor,
                      noisy: Optional[torch.Tensor], eps) -> torch.Tensor:
        """Pass 1: net_in = c_in (P src + Q eps), shaped like clean."""

    @abc.abstractmethod
    def residual_loss(self, coefs: StepCoefficients, F: torch.Tensor, net_in: torch.Tensor,
                      clean: torch.Tensor, noisy: Optional[torch.Tensor], *,
                      backward_scale: float = 1.0) -> torch.Tensor:
        """Pass 2: the per-sample loss [B], whose backward reaches F.

        backward_scale: the factor the caller multiplies the batch MEAN of this loss by before
        calling backward (1/accumulation steps; DeepSpeed divides by them itself), so the
        incoming gradient per sample is backward_scale / B. An implementation that writes dF
        in the forward pass writes it for that gradient; the gradient is exact whatever the
        caller does, but the expected one costs no rescaling pass. The value is unaffected.
        """

    def loss(self, network: Callable, coefs: StepCoefficients, clean: torch.Tensor,
             noisy: Optional[torch.Tensor], eps, labels=None, *,
             backward_scale: float = 1.0) -> torch.Tensor:
        """Per-sample loss [B]: pass 1, ONE call network(net_in, coefs.c_noise, labels), pass 2."""
        net_in = self.network_input(coefs, clean, noisy, eps)
        F = network(net_in, coefs.c_noise, labels)
        return self.residual_loss(coefs, F, net_in, clean, noisy, backward_scale=backward_scale)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _source(coefs: StepCoefficients, clean: torch.Tensor, noisy: Optional[torch.Tensor]):
    if noisy is None:  # allowed only when no sample is ambient (checked by the loss classes)
        return clean
    return torch.where(_per_sample(coefs.ambient, clean), noisy, clean)


class ReferenceKernel(TwoBranchKernel):
    """The two passes in plain PyTorch; autograd does the backward (backward_scale is not
    needed). The definition every other implementation is tested against, and what runs on
    a CPU. Use the instance REFERENCE."""

    name = "reference"

    @staticmethod
    def _inputs(coefs, clean, noisy, eps) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_in, net_in) = (P src + Q eps, c_in x_in)."""
        if not isinstance(eps, torch.Tensor):   # counter-based noise: draw it as a tensor here
            eps = eps.normal_like(clean)
        x_in = _per_sample(coefs.P, clean) * _source(coefs, clean, noisy) + _per_sample(coefs.Q, eps) * eps
        return x_in, _per_sample(coefs.c_in, x_in) * x_in

    def network_input(self, coefs, clean, noisy, eps):
        return self._inputs(coefs, clean, noisy, eps)[1]

    def residual_loss(self, coefs, F, net_in, clean, noisy, *, backward_scale=1.0,
                      x_in: Optional[torch.Tensor] = None):
        """x_in (reference only): pass 1's exact x_in, if the caller still holds it. Otherwise
        it is recovered as net_in / c_in, which is exact only to an ulp; `loss` passes it, which
        keeps sigma_tn = 0 bit for bit the plain EDM loss."""
        if x_in is None:
            x_in = net_in / _per_sample(coefs.c_in, net_in)
        src = _source(coefs, clean, noisy)
        r = _per_sample(coefs.A, F) * F + _per_sample(coefs.B, x_in) * x_in + _per_sample(coefs.C, src) * src
        return coefs.weight * r.square().sum(dim=tuple(range(1, r.ndim)))

    def loss(self, network, coefs, clean, noisy, eps, labels=None, *, backward_scale=1.0):
        # As TwoBranchKernel.loss, but pass 2 gets pass 1's exact x_in.
        x_in, net_in = self._inputs(coefs, clean, noisy, eps)
        F = network(net_in, coefs.c_noise, labels)
        return self.residual_loss(coefs, F, net_in, clean, noisy, x_in=x_in)


REFERENCE = ReferenceKernel()


def select_kernel(kind: str = "auto", device=None) -> TwoBranchKernel:
    """The implementation of the two passes for `kind` (objective.kernel) on `device`.

    "reference": REFERENCE. "auto": REFERENCE off a GPU; on a GPU the CUDA extension if it
    builds, else Triton, else REFERENCE. "triton" / "cuda": that one (Triton also runs on a
    CPU under TRITON_INTERPRET=1, for tests). Raises KernelChoiceError for an unknown kind or
    one that cannot run on `device`, RuntimeError with the compiler's message when the CUDA
    extension fails to build. Call once per device and keep the object.
    """
    if kind not in KERNEL_KINDS:
        raise KernelChoiceError(f"objective.kernel: {kind!r} is not one of {', '.join(KERNEL_KINDS)}")
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if kind == "reference" or (kind == "auto" and not on_gpu):
        return REFERENCE
    # The one place this module reaches into the kernels package: lazily, to construct.
    from ambient_dist import kernels
    return kernels.fused_kernel(kind, device)


# --------------------------------------------------------------------------------------
# 4. The training distribution of noise levels and branches (part of the method: which
#    sigma each sample sees and so which branch it takes; the draws come from noise.py)
# --------------------------------------------------------------------------------------

def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def sample_lognormal_sigma(batch: int, P_mean: float, P_std: float, sigma_tn: float,
                           rule: str, generator=None, device="cpu"):
    """Noise levels and branches for one batch: (sigma float32 [B], ambient bool [B]).

    "threshold": sigma = exp(P_mean + P_std xi), xi ~ N(0, 1); ambient iff sigma >= sigma_tn
                 (the clean fraction is Phi((ln sigma_tn - P_mean) / P_std)).
    "uniform":   each sample is ambient with probability 1/2, and its sigma is drawn from the
                 same log-normal restricted to its side, by inverting the CDF (no rejection
                 loop, so the cost and the number of draws are fixed).
    sigma_tn = 0 means no noisy copies: every sample is clean and sigma is the plain EDM draw,
    whatever the rule, so the objective is the plain one given the same random draws.
    """
    if sigma_tn <= 0 or rule == "threshold":
        sigma = (draw_normal([batch], generator, device) * P_std + P_mean).exp()
        ambient = sigma >= sigma_tn if sigma_tn > 0 else torch.zeros_like(sigma, dtype=torch.bool)
        return sigma, ambient
    if rule != "uniform":
        raise ValueError(f"objective.branch_rule: unknown rule {rule!r} (threshold, uniform)")
    ambient = draw_uniform([batch], generator, device) < 0.5
    return _lognormal_on_side(ambient, P_mean, P_std, sigma_tn, generator, device), ambient


def _lognormal_on_side(ambient: torch.Tensor, P_mean: float, P_std: float, sigma_tn: float,
                       generator, device) -> torch.Tensor:
    """sigma [B] from the log-normal restricted to sigma >= sigma_tn where `ambient`, to
    sigma <= sigma_tn elsewhere, by inverting the CDF (one uniform draw per sample)."""
    u = draw_uniform([ambient.shape[0]], generator, device).double()
    # float64: the inverse CDF is evaluated near 0 and 1, where float32 runs out of digits.
    p_tn = float(_normal_cdf(torch.tensor((math.log(sigma_tn) - P_mean) / P_std, dtype=torch.float64)))
    p = torch.where(ambient, p_tn + u * (1.0 - p_tn), u * p_tn).clamp(1e-15, 1.0 - 1e-15)
    sigma = (P_mean + P_std * torch.special.ndtri(p)).exp().float()
    # Rounding (and the clamp) can put sigma a hair over the boundary; pin it to its side.
    return _pin_to_side(sigma, ambient, sigma_tn)


def sample_noise_only_sigma(batch: int, P_mean: float, P_std: float, sigma_tn: float,
                            generator=None, device="cpu"):
    """The noise-only baseline's levels: (sigma [B] from the log-normal restricted to
    sigma >= sigma_tn, ambient all True). Every sample takes the ambient branch."""
    ambient = torch.ones(batch, dtype=torch.bool, device=device)
    return _lognormal_on_side(ambient, P_mean, P_std, sigma_tn, generator, device), ambient


def _pin_to_side(sigma: torch.Tensor, ambient: torch.Tensor, sigma_tn: float) -> torch.Tensor:
    """sigma >= sigma_tn where ambient, <= sigma_tn elsewhere."""
    bound = torch.full_like(sigma, sigma_tn)
    return torch.where(ambient, torch.maximum(sigma, bound), torch.minimum(sigma, bound))



# --------------------------------------------------------------------------------------
# 5. Loss classes: build with build_loss(cfg.objective), call per micro-batch
# --------------------------------------------------------------------------------------

@dataclass
class LossOutput:
    loss: torch.Tensor        # scalar: mean over the batch of the per-sample sums
    per_sample: torch.Tensor  # [B]
    ambient: torch.Tensor     # bool [B]: which samples took the ambient branch
    sigma: torch.Tensor       # [B] (VE-equivalent) noise level, for logging


def _check_first_batch(loss, clean: torch.Tensor) -> None:
    """The loss classes' units check of pixel images in [-1, 1] (objective.md: images in [0, 1]
    silently halve the noise). Once, on the first batch: one host synchronisation per run,
    none per step."""
    if not loss._units_checked:
        check_image_range(clean, f"{type(loss).__name__}: clean images (first batch)")
        loss._units_checked = True


class _AmbientLoss:
    """Shared call path. Subclasses say how to draw noise levels and build coefficients.

    Called as loss_fn(net, clean, noisy, ...): clean float [B, C, H, W] in [-1, 1] (pixel
    forms; checked on the first call, ImageRangeError for [0, 1] or 0..255 input) or latents
    (latent_v); noisy: the stored noisy copies, same shape (float16 or float32)."""

    # Pixel forms check the units of their first batch; latents have no fixed range.
    checks_pixel_units = True

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self._kernels: dict[str, TwoBranchKernel] = {}   # chosen once per device
        self._units_checked = not self.checks_pixel_units

    def draw_levels(self, batch: int, device, generator=None):
        """(noise level [B], ambient bool [B])."""
        raise NotImplementedError

    def coefficients(self, net, level: torch.Tensor, ambient: torch.Tensor) -> StepCoefficients:
        raise NotImplementedError

    def network(self, net) -> Callable:
        """The raw network F(net_in, c_noise, labels) that the coefficients act on."""
        return net.raw

    def draw_noise(self, clean: torch.Tensor, generator=None, eps=None):
        """(level, ambient, eps): all the step's random draws, in this fixed order (eps is
        drawn only when not given)."""
        level, ambient = self.draw_levels(clean.shape[0], clean.device, generator)
        if eps is None:
            eps = draw_normal(clean.shape, generator, clean.device)
        return level, ambient, eps

    def __call__(self, net, clean: torch.Tensor, noisy: Optional[torch.Tensor], labels=None,
                 generator: Optional[torch.Generator] = None, eps=None,
                 augment: Optional[Callable] = None, mask: Optional[torch.Tensor] = None,
                 backward_scale: float = 1.0) -> LossOutput:
        """eps: optional noise to use instead of drawing it -- a tensor shaped like clean, or
        an ambient_dist.kernels.PhiloxNoise, which the fused input pass draws in-kernel (no eps
        tensor is written or read) and which is the same per sample however the batch is split.

        augment: optional data.augment.GeometricAugment. It runs once the branches are drawn
        (it needs them: resampling transforms go to clean-branch samples only) and its labels
        condition the network.

        backward_scale: the factor the caller multiplies the returned `loss` by before
        backward (1/accumulation steps, also under DeepSpeed, which divides by them itself).
        The fused kernels write dF for it in their forward pass, saving a rescaling pass; the
        reported loss is the unscaled mean either way (TwoBranchKernel.residual_loss)."""
        if mask is not None:
            raise ValueError(f"objective.method={self.cfg.method!r} takes no inpainting masks "
                             "(these shards were made for objective.method=masking)")
        _check_first_batch(self, clean)
        level, ambient, eps = self.draw_noise(clean, generator, eps)
        network = self.network(net)
        if augment is not None:
            clean, noisy, augment_labels = augment(clean, noisy, ambient, generator)
            network = functools.partial(network, augment_labels=augment_labels)
        if noisy is None:
            if bool(ambient.any()):
                raise ValueError(f"objective.sigma_tn={self.cfg.sigma_tn}: ambient samples need "
                                 "the dataset's noisy copies, but none were given")
        elif noisy.shape != clean.shape:
            raise ValueError(f"noisy copies have shape {tuple(noisy.shape)}, clean images "
                             f"{tuple(clean.shape)}")
        # noisy may stay float16 (as stored): both passes read it as is and compute in float32.
        coefs = self.coefficients(net, level, ambient)
        per_sample = self.kernel(clean.device).loss(network, coefs, clean, noisy, eps, labels,
                                                    backward_scale=backward_scale)
        return LossOutput(per_sample.mean(), per_sample, coefs.ambient, coefs.sigma)

    def kernel(self, device) -> TwoBranchKernel:
        """The two-pass implementation for `device` (select_kernel(cfg.kernel, device), once)."""
        key = str(device)
        if key not in self._kernels:
            self._kernels[key] = select_kernel(self.cfg.kernel, device)
        return self._kernels[key]


def _check_sigma_data(cfg: ObjectiveConfig, net) -> None:
    net_sd = getattr(net, "sigma_data", None)
    if net_sd is not None and abs(float(net_sd) - cfg.sigma_data) > 1e-12:
        raise ValueError(f"objective.sigma_data={cfg.sigma_data} but the network's "
                         f"preconditioning uses sigma_data={net_sd}; make them equal")


class EDMAmbientLoss(_AmbientLoss):
    """Section 2: log-normal sigma (P_mean, P_std), EDM weight, the network's preconditioning."""

    def draw_levels(self, batch, device, generator=None):
        c = self.cfg
        return sample_lognormal_sigma(batch, c.P_mean, c.P_std, c.sigma_tn, c.branch_rule,
                                      generator, device)

    def coefficients(self, net, sigma, ambient):
        _check_sigma_data(self.cfg, net)
        return edm_coefficients(net, sigma, ambient, self.cfg.sigma_tn, self.cfg.sigma_data)


class VPAmbientLoss(_AmbientLoss):
    """Section 3 with EDM's VP training distribution.

    t is drawn uniformly in [vp_epsilon_t, 1] and sigma = vp_sigma(t), as EDM's VPLoss does,
    rather than log-normal: the VP preconditioning conditions the network on t, the VP
    baseline was defined (and its results reported) with this distribution, and the point of
    the VP form is to reproduce that baseline. "uniform" rule: t uniform on its side of t_n.
    """

    def __init__(self, cfg: ObjectiveConfig):
        super().__init__(cfg)
        self.t_n = float(vp_t(torch.tensor(cfg.sigma_tn, dtype=torch.float64), cfg.vp_beta_d,
                              cfg.vp_beta_min))
        if cfg.sigma_tn > 0 and cfg.branch_rule == "uniform" and not cfg.vp_epsilon_t < self.t_n < 1:
            raise ValueError(f"objective.sigma_tn={cfg.sigma_tn}: outside the VP schedule's range "
                             f"(t_n={self.t_n:.4g}), the 'uniform' rule has an empty side")

    def draw_levels(self, batch, device, generator=None):
        c = self.cfg
        if c.sigma_tn > 0 and c.branch_rule == "uniform":
            ambient = draw_uniform([batch], generator, device) < 0.5
            lo = torch.where(ambient, self.t_n, c.vp_epsilon_t)
            hi = torch.where(ambient, 1.0, self.t_n)
            sigma = vp_sigma(lo + draw_uniform([batch], generator, device) * (hi - lo), c.vp_beta_d, c.vp_beta_min)
            # Rounding can put sigma a hair over the boundary; pin it to its side.
            return _pin_to_side(sigma, ambient, c.sigma_tn), ambient
        t = 1 + draw_uniform([batch], generator, device) * (c.vp_epsilon_t - 1)
        sigma = vp_sigma(t, c.vp_beta_d, c.vp_beta_min)
        return sigma, (sigma >= c.sigma_tn) & (c.sigma_tn > 0)

    def coefficients(self, net, sigma, ambient):
        return vp_coefficients(net, sigma, ambient, self.cfg.sigma_tn)


class LatentVAmbientLoss(_AmbientLoss):
    """Section 4: Stable Diffusion fine-tuning on latents with a v-prediction network.

    The level is the DDPM timestep t, uniform over the 1000 steps; ambient iff t > t_n
    ("uniform" rule: half the samples on each side, t uniform within it). objective.sigma_tn = 0
    turns the ambient branch off (plain v objective); otherwise t_n sets the copies' noise.
    `net` is a callable v(z_t, t, cond) -- or an object whose .raw is one.
    """

    checks_pixel_units = False  # VAE latents, not [-1, 1] images

    def __init__(self, cfg: ObjectiveConfig):
        super().__init__(cfg)
        if cfg.sigma_tn > 0 and cfg.branch_rule == "uniform" and cfg.t_n >= DDPM_STEPS - 1:
            raise ValueError(f"objective.t_n={cfg.t_n}: the 'uniform' rule needs t_n < "
                             f"{DDPM_STEPS - 1} so that the ambient side is not empty")

    def network(self, net):
        return getattr(net, "raw", net)

    def draw_levels(self, batch, device, generator=None):
        c = self.cfg
        if c.sigma_tn > 0 and c.branch_rule == "uniform":
            ambient = draw_uniform([batch], generator, device) < 0.5
            u = draw_uniform([batch], generator, device).double()
            clean_t = (u * (c.t_n + 1)).floor()
            ambient_t = c.t_n + 1 + (u * (DDPM_STEPS - 1 - c.t_n)).floor()
            t = torch.where(ambient, ambient_t, clean_t).long().clamp(0, DDPM_STEPS - 1)
            return t, ambient
        t = draw_randint(DDPM_STEPS, [batch], generator, device)
        ambient = (t > c.t_n) & (c.sigma_tn > 0)
        return t, ambient

    def coefficients(self, net, t, ambient):
        return latent_v_coefficients(t, ambient, self.cfg.t_n, self.cfg.latent_loss_space)


class NoiseOnlyLoss(EDMAmbientLoss):
    """Table 2's noise-only baseline (Daras, Dimakis, Daskalakis 2024, "Consistent Diffusion
    Meets Tweedie"), without that paper's consistency loss below sigma_tn: every sample reads
    its fixed noisy copy, sigma comes from the log-normal restricted to sigma >= sigma_tn, and
    the loss is section 2's ambient branch. The model learns E[x0 | x_sigma] for sigma >= sigma_tn
    only, so sampling stops at sigma_tn (sampling.method_sampler)."""

    def draw_levels(self, batch, device, generator=None):
        c = self.cfg
        return sample_noise_only_sigma(batch, c.P_mean, c.P_std, c.sigma_tn, generator, device)


class MaskingLoss:
    """Table 2's masking baseline (Daras et al. 2023, "Ambient Diffusion: Learning Clean
    Distributions from Corrupted Data"), EDM form. Per sample, with A the image's ONE fixed
    inpainting mask (stored in the shards) and A~ = A * B, B ~ Bernoulli(1 - mask_delta) per
    element drawn afresh each step (the further corruption):

        x_in   = A~ (x0 + sigma eps)           (what the network sees, with A~ as extra channels)
        loss_i = lambda(sigma) || A (D(x_in, A~; sigma) - x0) ||^2

    Only pixels that A keeps are ever read (the observation A x0); pixels A~ erased but A kept
    are what forces the network to predict E[x0 | A~, x_in] rather than to copy its input.
    sigma is EDM's log-normal. Plain PyTorch (no fused kernel: the masks are per element).
    clean: float32 [B, C, H, W] in [-1, 1]; mask: [B, C, H, W] of 0/1 (any dtype).
    """

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self._units_checked = False

    def __call__(self, net, clean: torch.Tensor, noisy: Optional[torch.Tensor], labels=None,
                 generator: Optional[torch.Generator] = None, eps=None,
                 augment: Optional[Callable] = None, mask: Optional[torch.Tensor] = None,
                 backward_scale: float = 1.0) -> LossOutput:
        # backward_scale: accepted for the common call signature; autograd needs no hint here.
        if mask is None:
            raise ValueError("objective.method=masking needs each image's fixed inpainting mask: "
                             "make the shards with make_shards --mask-corruption P")
        if augment is not None:
            raise ValueError("objective.method=masking: geometric augmentation is not supported")
        if mask.shape != clean.shape:
            raise ValueError(f"inpainting masks have shape {tuple(mask.shape)}, clean images "
                             f"{tuple(clean.shape)}")
        _check_first_batch(self, clean)
        c = self.cfg
        _check_sigma_data(c, net)
        sigma, _ = sample_lognormal_sigma(clean.shape[0], c.P_mean, c.P_std, 0.0, "threshold",
                                          generator, clean.device)
        if eps is None:
            eps = draw_normal(clean.shape, generator, clean.device)
        keep = draw_uniform(clean.shape, generator, clean.device) >= c.mask_delta
        A = mask.to(clean.dtype)
        A_further = A * keep.to(clean.dtype)
        D = net(clean + _per_sample(sigma, clean) * eps, sigma, labels, mask=A_further)
        per_sample = edm_weight(sigma, c.sigma_data) * (A * (D - clean)).square().sum(dim=(1, 2, 3))
        ambient = torch.ones_like(sigma, dtype=torch.bool)  # every sample is corrupted data
        return LossOutput(per_sample.mean(), per_sample, ambient, sigma)


def build_loss(cfg: ObjectiveConfig):
    """The loss object for `cfg.method` and `cfg.form`: loss_fn(net, clean, noisy, labels,
    generator=None, eps=None, augment=None, mask=None, backward_scale=1.0) -> LossOutput."""
    if cfg.method == "noise_only":
        return NoiseOnlyLoss(cfg)
    if cfg.method == "masking":
        return MaskingLoss(cfg)
    forms = {"edm": EDMAmbientLoss, "vp": VPAmbientLoss, "latent_v": LatentVAmbientLoss}
    if cfg.form not in forms:
        raise ValueError(f"objective.form: unknown form {cfg.form!r} ({', '.join(forms)})")
    return forms[cfg.form](cfg)
