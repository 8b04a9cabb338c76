"""One-shot GPU check of the fused two-branch kernels: build, verify, time. Sized for < 5 min.

    python -m ambient_dist.kernels.gpu_check --out gpu_check.json

1. build   the CUDA extension (cuda_ext.py) and the Triton kernels; build times.
2. verify  each implementation against the PyTorch reference evaluated in float64 on fresh
           random inputs: float32 / bfloat16 / float16 storage, odd sizes, batch 1, a row
           misaligned for vector loads, every branch mix and sigma at sigma_tn (A = 0), atomic
           and deterministic reductions, non-mean incoming gradients, in-kernel Philox noise
           (against kernels/philox.py and across batch splits). Outputs are "poisoned": the
           allocator's free blocks are filled with NaN first, so an element a kernel forgets
           to write shows up as NaN.
3. time    one objective step (pass 1, pass 2, backward to F) at DDPM++ 32x32 batch 512,
           64x64 batch 256, 4x64x64 latents batch 256 and a large latent batch, for the fused
           kernels, the PyTorch eager reference and torch.compile of it (CUDA events,
           medians). Achieved GB/s counts the bytes the fused design must move (pass 1: read
           src and eps, write net_in; pass 2: read F, net_in, src, write dF); it is compared
           with a device copy measured in the same run, both of the same byte count and large.
4. share   of a whole DDPM++ training step (U-Net forward + backward, bf16 autocast) that the
           objective takes, at 32x32 batch 256, if ambient_dist.models is importable.

Every section runs under try/except, so one failure costs only its own figures; all of it is
printed as Markdown tables and written as JSON to --out (tables also beside it, .md). Sections
past --budget-s seconds are skipped and say so. Without a GPU (`--device cpu --quick`, with
TRITON_INTERPRET=1) the same code runs at toy sizes: that is how the CPU tests exercise it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

import torch

from ambient_dist.fileio import atomic_write_text
from ambient_dist.objective import REFERENCE, select_kernel
from ambient_dist.provenance import provenance

from .philox import PhiloxNoise

# (name, batch, per-sample shape) of the timed steps.
# (name, batch, per-sample shape, compare with torch.compile): compiling costs ~20 s a shape,
# so the large-batch row (bandwidth-bound behaviour) is timed against eager only.
TIMED = [("ddpmpp-32x32", 512, (3, 32, 32), True), ("64x64", 256, (3, 64, 64), True),
         ("latent-4x64x64", 256, (4, 64, 64), True), ("latent-4x64x64", 2048, (4, 64, 64), False)]
TIMED_QUICK = [("toy-3x8x8", 4, (3, 8, 8), False)]
# (batch, shape, mix) of the correctness cases: odd sizes, batch 1, latents, the threshold.
CASES = [(8, (3, 32, 32), "mixed"), (5, (3, 17, 19), "mixed"), (1, (1, 1, 1), "ambient"),
         (3, (4, 64, 64), "clean"), (6, (3, 8, 8), "edge"), (2, (1, 1, 4099), "ambient")]
CASES_QUICK = [(3, (3, 5, 7), "mixed"), (1, (1, 1, 1), "ambient"), (4, (2, 3, 3), "edge")]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


# The reference the kernels are held to: ambient_dist.objective's PyTorch implementation.
REF_INPUT, REF_LOSS = REFERENCE.network_input, REFERENCE.residual_loss


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------

def coefficients(batch: int, mix: str, device, g: torch.Generator, dtype=torch.float32):
    """Per-sample coefficients of EDM-like magnitudes (the kernels do not care which form)."""
    u = lambda: torch.rand(batch, generator=g)  # noqa: E731
    if mix == "clean":
        ambient = torch.zeros(batch, dtype=torch.bool)
    elif mix == "ambient":
        ambient = torch.ones(batch, dtype=torch.bool)
    else:
        ambient = torch.arange(batch) % 2 == 0
    c = types.SimpleNamespace(P=torch.ones(batch), Q=0.01 + 10 * u(), c_in=0.05 + 1.9 * u(),
                              A=0.05 + u(), B=u(), C=-torch.ones(batch), weight=0.5 + 100 * u(),
                              ambient=ambient)
    if mix == "edge":   # sigma exactly at sigma_tn: ambient with a = 0, so A = 0
        c.ambient[0], c.A[0] = True, 0.0
    for k, v in vars(c).items():
        setattr(c, k, v.to(device) if k == "ambient" else v.to(device, dtype))
    return c


def tensors(batch, shape, dtype, device, g, misaligned=False):
    """clean, noisy, eps, F; misaligned: each a contiguous view 1 element off an aligned base."""
    def one(scale, offset):
        x = (torch.randn(batch, *shape, generator=g) * scale + offset)
        if misaligned:
            base = torch.empty(x.numel() + 1, dtype=dtype, device=device)
            view = base[1:].view(batch, *shape)
            view.copy_(x)
            return view
        return x.to(device, dtype)
    clean = one(0.6, 0.0).clamp(-1, 1)
    return clean, one(0.8, 0.0), one(1.0, 0.0), one(1.0, 0.0)


def poison(device, nbytes_each: int, count: int = 12) -> None:
    """Fill free allocator blocks with NaN so that unwritten kernel outputs are visible."""
    if torch.device(device).type != "cuda":
        return
    numel = max(1, nbytes_each // 4)
    blocks = [torch.full((numel,), float("nan"), device=device) for _ in range(count)]
    small = [torch.full((max(1, numel // 64),), float("nan"), device=device) for _ in range(count)]
    del blocks, small


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    if not torch.isfinite(ours).all():
        return math.inf
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------

def verify_case(impl, batch, shape, mix, dtype, device, seed, deterministic=False,
                misaligned=False, upstream=None, noisy_dtype=None, out_dtype=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = coefficients(batch, mix, device, g)
    clean, noisy, eps, F = tensors(batch, shape, dtype, device, g, misaligned)
    if noisy_dtype is not None:      # e.g. float16 noisy copies, read as stored
        noisy = noisy.to(noisy_dtype)
    poison(device, clean.numel() * 4)
    kernel = select_kernel(impl, device)
    net_in = kernel.network_input(c, clean, noisy, eps, out_dtype=out_dtype)
    Fg = F.detach().clone().requires_grad_()
    loss = kernel.residual_loss(c, Fg, net_in, clean, noisy, deterministic=deterministic)
    weights = torch.full((batch,), 1.0 / batch, device=device) if upstream is None else upstream(batch, device)
    (grad,) = torch.autograd.grad(loss, Fg, weights)
    # The reference in float64, fed exactly the values the kernels read.
    c64 = types.SimpleNamespace(**{k: (v if k == "ambient" else v.double()) for k, v in vars(c).items()})
    ref_in = REF_INPUT(c64, clean.double(), noisy.double(), eps.double())
    F64 = F.detach().double().requires_grad_()
    ref_loss = REF_LOSS(c64, F64, net_in.double(), clean.double(), noisy.double())
    (ref_grad,) = torch.autograd.grad(ref_loss, F64, weights.double())
    errs = {"net_in": rel_err(net_in, ref_in), "loss": rel_err(loss, ref_loss), "grad": rel_err(grad, ref_grad)}
    # The reference reads the very values the kernels read, so only rounding of the outputs
    # (net_in in out_dtype, dF in F's dtype) sets the tolerance, not the inputs' storage.
    tol = max(TOLERANCE[dtype], TOLERANCE[out_dtype or dtype])
    name = lambda t: str(t).split(".")[-1]  # noqa: E731
    label = name(dtype) + (f", noisy {name(noisy_dtype)}" if noisy_dtype else "") + (
        f", net_in {name(out_dtype)}" if out_dtype else "")
    return {"impl": impl, "batch": batch, "shape": list(shape), "mix": mix, "dtype": label,
            "deterministic": deterministic, "misaligned": misaligned,
            "upstream": "mean" if upstream is None else "weighted", **errs, "tolerance": tol,
            "ok": all(e < tol for e in errs.values())}


def verify_noise(impl, device, quick) -> list[dict]:
    batch, shape = (4, (3, 5, 7)) if quick else (64, (4, 64, 64))
    g = torch.Generator().manual_seed(7)
    c = coefficients(batch, "mixed", device, g)
    c.P, c.Q, c.c_in = torch.zeros_like(c.P), torch.ones_like(c.Q), torch.ones_like(c.c_in)  # net_in = eps
    clean, noisy, _, _ = tensors(batch, shape, torch.float32, device, g)
    noise = PhiloxNoise(seed=0x1234_5678_9ABC, step=1_000_003, first_sample=17)
    poison(device, clean.numel() * 4)
    kernel = select_kernel(impl, device)
    eps = kernel.network_input(c, clean, noisy, noise)
    ref = noise.normal_like(clean)
    half = batch // 2
    parts = []
    for lo, hi in ((0, half), (half, batch)):
        part = types.SimpleNamespace(**{k: v[lo:hi] for k, v in vars(c).items()})
        parts.append(kernel.network_input(part, clean[lo:hi], noisy[lo:hi],
                                          PhiloxNoise(noise.seed, noise.step, noise.first_sample + lo)))
    split_equal = bool(torch.equal(torch.cat(parts), eps))
    abs_err = float((eps - ref).abs().max()) if torch.isfinite(eps).all() else math.inf
    flat = eps.flatten().double()
    return [{"impl": impl, "check": "philox noise", "batch": batch, "shape": list(shape),
             "max_abs_err_vs_torch": abs_err, "split_invariant": split_equal,
             "mean": float(flat.mean()), "std": float(flat.std()),
             "ok": abs_err < 1e-4 and split_equal and abs(float(flat.mean())) < 0.05
             and abs(float(flat.std()) - 1) < 0.05}]


def verify(impl, device, quick) -> list[dict]:
    rows = []
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16, torch.float16]
    cases = CASES_QUICK if quick else CASES
    for dtype in dtypes:
        # Both reductions in float32; the 16-bit types with the default (atomics) only, since
        # every extra kernel variant costs a JIT compile out of the time budget.
        modes = (False, True) if dtype == torch.float32 else (False,)
        for i, (batch, shape, mix) in enumerate(cases):
            for deterministic in modes:
                rows.append(verify_case(impl, batch, shape, mix, dtype, device, seed=100 + i,
                                        deterministic=deterministic))
    weighted = lambda b, d: torch.linspace(-2.0, 3.0, b, device=d)  # noqa: E731
    rows.append(verify_case(impl, 5, (3, 17, 19), "mixed", torch.float32, device, 11, upstream=weighted))
    rows.append(verify_case(impl, 4, (3, 16, 16), "mixed", torch.float32, device, 12, misaligned=True))
    rows.append(verify_case(impl, 4, (3, 16, 16), "mixed", torch.bfloat16, device, 13, misaligned=True))
    # The training step's mix: float32 images, float16 noisy copies as stored, bf16 network input.
    rows.append(verify_case(impl, 6, (3, 32, 32), "mixed", torch.float32, device, 14, noisy_dtype=torch.float16))
    rows.append(verify_case(impl, 6, (3, 17, 19), "mixed", torch.float32, device, 15, noisy_dtype=torch.float16,
                            out_dtype=torch.bfloat16))
    return rows


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

# GPU cycles to hold the stream before each timed repeat (~10-25 ms): see `timer`.
SLEEP_CYCLES = 40_000_000


def timer(device):
    """measure(fn, repeats, inner, warmup) -> (median seconds per call, per-repeat seconds).

    On a GPU each repeat first queues a sleep kernel, so the host enqueues all `inner` calls
    while the device waits and the CUDA events then time the device work back to back. In
    training the U-Net's GPU time hides the host's launch overhead the same way, so this is
    the figure that matters there; the host time per call is kept too (`measure.host`).
    """
    cuda = torch.device(device).type == "cuda"

    def measure(fn, repeats=7, inner=10, warmup=3):
        for _ in range(warmup):
            fn()
        times, host = [], []
        if cuda:
            torch.cuda.synchronize()
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(SLEEP_CYCLES)
                start.record()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                host.append((time.perf_counter() - t0) / inner)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times.append((time.perf_counter() - t0) / inner)
            host = times
        measure.host = statistics.median(host)
        return statistics.median(times), times
    measure.host = None
    return measure


def reference_step(F, clean, noisy, eps, P, Q, c_in, A, B, C, weight, ambient):
    """The objective step as PyTorch code: pass 1, pass 2, mean (eager, or under torch.compile)."""
    c = types.SimpleNamespace(P=P, Q=Q, c_in=c_in, A=A, B=B, C=C, weight=weight, ambient=ambient)
    net_in = REF_INPUT(c, clean, noisy, eps)
    return net_in, REF_LOSS(c, F, net_in, clean, noisy).mean()


def time_shape(name, batch, shape, dtype, impls, device, measure, compile_ref, quick) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    c = coefficients(batch, "mixed", device, g)
    clean, noisy, eps, F = tensors(batch, shape, dtype, device, g)
    F.requires_grad_()
    coef_args = (c.P, c.Q, c.c_in, c.A, c.B, c.C, c.weight, c.ambient)
    elem = clean.numel()
    size = clean.element_size()
    bytes_tensor_eps, bytes_seeded = 7 * elem * size, 6 * elem * size
    reps = dict(repeats=3, inner=2, warmup=1) if quick else dict(repeats=7, inner=10, warmup=3)

    def run_ref(step):
        net_in, loss = step(F, clean, noisy, eps, *coef_args)
        return net_in, torch.autograd.grad(loss, F)[0]

    def run_fused(impl, noise):
        kernel = select_kernel(impl, device)
        net_in = kernel.network_input(c, clean, noisy, noise)
        loss = kernel.residual_loss(c, F, net_in, clean, noisy).mean()
        return net_in, torch.autograd.grad(loss, F)[0]

    results, host = {}, {}

    def timed(label, fn):
        try:
            results[label] = measure(fn, **reps)
            host[label] = getattr(measure, "host", None)
        except Exception as e:  # one baseline failing (e.g. torch.compile) keeps the others
            results[label] = e

    timed("eager", lambda: run_ref(reference_step))
    if compile_ref:
        compiled = torch.compile(reference_step, dynamic=False)
        timed("compile", lambda: run_ref(compiled))
    for impl in impls:
        timed(impl, lambda: run_fused(impl, eps))
        timed(impl + "+philox", lambda: run_fused(impl, PhiloxNoise(1, 2, 0)))
    # Device copies: one moving the same bytes as the fused step, and a large one (peak).
    src = torch.empty(bytes_tensor_eps // 2 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    same = measure(lambda: dst.copy_(src), **reps)
    big_n = (256 << 20) // 4 if not quick else 1 << 16
    big_src = torch.empty(big_n, dtype=torch.float32, device=device)
    big_dst = torch.empty_like(big_src)
    peak = measure(lambda: big_dst.copy_(big_src), **reps)
    same_gbs = 2 * src.numel() * 4 / same[0] / 1e9
    peak_gbs = 2 * big_n * 4 / peak[0] / 1e9
    rows = []
    for label, res in results.items():
        row = {"shape": name, "batch": batch, "dtype": str(dtype).split(".")[-1], "impl": label}
        if isinstance(res, Exception):
            rows.append({**row, "error": repr(res)[:300]})
            continue
        med, reps_ = res
        nbytes = bytes_seeded if label.endswith("+philox") else bytes_tensor_eps
        gbs = nbytes / med / 1e9
        row.update(time_us=med * 1e6, repeats_us=[t * 1e6 for t in reps_], gb_per_s=gbs,
                   vs_copy_same_bytes=gbs / same_gbs, vs_copy_peak=gbs / peak_gbs,
                   host_us=None if host.get(label) is None else host[label] * 1e6)
        if isinstance(results.get("eager"), tuple):
            row["speedup_vs_eager"] = results["eager"][0] / med
        if isinstance(results.get("compile"), tuple):
            row["speedup_vs_compile"] = results["compile"][0] / med
        rows.append(row)
    rows.append({"shape": name, "batch": batch, "impl": "device copy (same bytes)",
                 "time_us": same[0] * 1e6, "gb_per_s": same_gbs})
    rows.append({"shape": name, "batch": batch, "impl": f"device copy ({big_n * 4 / 2 ** 20:g} MiB)",
                 "time_us": peak[0] * 1e6, "gb_per_s": peak_gbs})
    del F
    return rows


def _ddpmpp_step(device, quick, resolution, batch, channel_mult):
    """A DDPM++ U-Net forward+backward (bf16 autocast) -> (step, batch, (C, H, W), label)."""
    from ambient_dist.config import ExperimentConfig
    from ambient_dist.models import build_network
    cfg = ExperimentConfig()
    cfg.data.resolution, cfg.network.channel_mult = resolution, list(channel_mult)
    if quick:
        batch = 4
        cfg.network.model_channels, cfg.network.num_blocks, cfg.data.resolution = 16, 1, 8
        cfg.network.attn_resolutions = [4]
    net = build_network(cfg).to(device)
    res, ch = cfg.data.resolution, cfg.data.channels
    x = torch.randn(batch, ch, res, res, device=device)
    c_noise = torch.randn(batch, device=device)

    def unet_step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            out = net.raw(x, c_noise)
        out.float().square().mean().backward()
    return unet_step, batch, (ch, res, res), f"DDPM++ {res}x{res} U-Net forward+backward, bf16 autocast"


def _sd2_step(device, resolution, batch):
    """The Stable Diffusion 2 U-Net (random weights; needs diffusers) on 4 x res x res latents
    with 77 text tokens, forward+backward under bf16 autocast."""
    from diffusers import UNet2DConditionModel

    from ambient_dist.text.sd_models import SD2_TEXT_TOKENS, SD2_UNET_CONFIG
    with torch.device(device):  # initialise on the device: 865M parameters
        unet = UNet2DConditionModel(**SD2_UNET_CONFIG)
    z = torch.randn(batch, 4, resolution, resolution, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    text = torch.randn(batch, SD2_TEXT_TOKENS, SD2_UNET_CONFIG["cross_attention_dim"], device=device)

    def unet_step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            out = unet(z, t, encoder_hidden_states=text).sample
        out.float().square().mean().backward()
    return unet_step, batch, (4, resolution, resolution), \
        f"SD 2 U-Net, 4x{resolution}x{resolution} latents, forward+backward, bf16 autocast"


def step_share(impls, device, measure, quick, resolution=32, batch=256, channel_mult=(2, 2, 2),
               network="ddpmpp") -> list[dict]:
    """Share of a training step taken by the objective, per impl. network "ddpmpp" (default:
    CIFAR-10's at 32x32; 64x64: EDM's FFHQ-64 network, channel_mult (1, 2, 2, 2)) or "sd2"
    (Stable Diffusion 2 on latents of side `resolution`)."""
    if network == "sd2":
        unet_step, batch, shape, what = _sd2_step(device, resolution, batch)
    else:
        unet_step, batch, shape, what = _ddpmpp_step(device, quick, resolution, batch, channel_mult)
    res = shape[-1]
    reps = dict(repeats=2, inner=1, warmup=1) if quick else dict(repeats=3, inner=1, warmup=2)
    unet, _ = measure(unet_step, **reps)
    rows = [{"what": what, "batch": batch, "time_ms": unet * 1e3}]
    g = torch.Generator().manual_seed(2)
    c = coefficients(batch, "mixed", device, g)
    clean, noisy, eps, F = tensors(batch, shape, torch.float32, device, g)
    F.requires_grad_()
    coef_args = (c.P, c.Q, c.c_in, c.A, c.B, c.C, c.weight, c.ambient)
    steps = {"eager": lambda: torch.autograd.grad(reference_step(F, clean, noisy, eps, *coef_args)[1], F)}
    for impl in impls:
        kernel = select_kernel(impl, device)
        steps[impl] = lambda kernel=kernel: torch.autograd.grad(kernel.residual_loss(
            c, F, kernel.network_input(c, clean, noisy, eps), clean, noisy).mean(), F)
    for label, fn in steps.items():
        t, _ = measure(fn, **(dict(repeats=3, inner=2, warmup=1) if quick else dict(repeats=7, inner=10, warmup=3)))
        rows.append({"what": f"objective ({label}), {res}x{res}", "batch": batch, "time_ms": t * 1e3,
                     "share_of_step": t / (unet + t)})
    return rows


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------

class Report:
    """Sections and errors so far; written out (JSON + Markdown) after every section, so a run
    killed from outside still leaves everything finished before the kill."""

    def __init__(self, budget_s: float, out: Path):
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.out = out
        self.data: dict = {"sections": {}, "errors": {}}

    def save(self) -> str:
        self.data["elapsed_s"] = time.monotonic() - self.start
        md = markdown(self.data)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out, json.dumps(self.data, indent=1, default=str))
        atomic_write_text(self.out.with_suffix(".md"), md)
        return md

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def run(self, name: str, fn, *args, need_s: float = 0.0):
        if self.left() < need_s:
            self.data["errors"][name] = f"skipped: {self.left():.0f} s of the time budget left, needs ~{need_s:.0f} s"
            print(f"[gpu_check] {name}: skipped (time budget)", flush=True)
            return None
        t0 = time.monotonic()
        try:
            out = fn(*args)
            self.data["sections"][name] = out
            return out
        except Exception:
            self.data["errors"][name] = traceback.format_exc()
            print(f"[gpu_check] {name}: FAILED\n{traceback.format_exc()}", flush=True)
            return None
        finally:
            print(f"[gpu_check] {name}: {time.monotonic() - t0:.1f} s", flush=True)
            self.save()


def environment(device) -> dict:
    # Versions, revision and machine from the package's one home of provenance.
    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **provenance(),
            "device": str(device), "reference": "ambient_dist.objective.REFERENCE"}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2 ** 30, 1))
    return info


class BackgroundBuild:
    """cuda_ext.load() in a thread (the compilers run as subprocesses, off the GIL)."""

    def __init__(self) -> None:
        import threading
        from . import cuda_ext
        self.error: BaseException | None = None
        self.seconds = None
        t0 = time.monotonic()

        def work():
            try:
                cuda_ext.load()
            except BaseException as e:  # reported by wait()
                self.error = e
            self.seconds = time.monotonic() - t0
        self.thread = threading.Thread(target=work, name="cuda-build", daemon=True)
        self.thread.start()

    def wait(self, timeout_s: float) -> dict:
        self.thread.join(max(1.0, timeout_s))
        if self.thread.is_alive():
            raise TimeoutError(f"the CUDA build is still running after the time budget ({timeout_s:.0f} s)")
        if self.error is not None:
            raise RuntimeError(f"CUDA build failed: {self.error}") from self.error
        return {"compile_s": self.seconds}


def build(impl, device) -> dict:
    t0 = time.monotonic()
    if impl == "cuda":
        from . import cuda_ext
        cuda_ext.load()
    # First calls compile (Triton JIT) or load; a tiny problem, both dtypes of each pass.
    for dtype in (torch.float32, torch.bfloat16):
        verify_case(impl, 2, (3, 8, 8), "mixed", dtype, device, seed=0)
    return {"impl": impl, "build_and_first_call_s": time.monotonic() - t0}


def fmt(v, digits=3):
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e-2 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return str(v)


def markdown(report: dict) -> str:
    env = report["sections"].get("environment", {})
    lines = [f"# Fused two-branch kernels: GPU check ({env.get('gpu') or env.get('device')}, {env.get('date')})", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}; "
             f"reference: {env.get('reference')}", ""]

    def table(title, rows, cols):
        if not rows:
            return
        lines.extend([f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)])
        for r in rows:
            lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
        lines.append("")

    for b in report["sections"].get("build", []) or []:
        lines.append(f"- build {b['impl']}: {b['build_and_first_call_s']:.1f} s (incl. first calls)")
    lines.append("")
    checks = [r for k, v in report["sections"].items() if k.startswith("verify") for r in (v or [])]
    failed = [r for r in checks if not r.get("ok")]
    lines.append(f"Verification: {len(checks) - len(failed)}/{len(checks)} checks within tolerance.")
    lines.append("")
    table("Verification failures" if failed else "Verification (worst per impl and dtype)",
          failed or _worst(checks),
          ["impl", "dtype", "batch", "shape", "mix", "deterministic", "misaligned", "upstream",
           "net_in", "loss", "grad", "tolerance", "ok"])
    noise = [r for r in checks if r.get("check") == "philox noise"]
    table("In-kernel noise", noise, ["impl", "batch", "shape", "max_abs_err_vs_torch", "split_invariant",
                                     "mean", "std", "ok"])
    timing = [r for k, v in report["sections"].items() if k.startswith("time") for r in (v or [])]
    table("Objective step (pass 1 + pass 2 + backward to F): median device time with the queue "
          "pre-filled; host_us = launch time per step on the CPU", timing,
          ["shape", "batch", "dtype", "impl", "time_us", "host_us", "gb_per_s", "vs_copy_same_bytes",
           "vs_copy_peak", "speedup_vs_eager", "speedup_vs_compile", "error"])
    table("Targets of issue 5 (>= 80% of copy bandwidth, >= 3x eager, >= 1x torch.compile)",
          _targets(timing), ["shape", "batch", "dtype", "impl", "bandwidth_vs_copy", "meets_80pct",
                             "speedup_vs_eager", "meets_3x", "speedup_vs_compile", "meets_compile"])
    table("Share of a DDPM++ training step", report["sections"].get("share") or [],
          ["what", "batch", "time_ms", "share_of_step"])
    if report["errors"]:
        lines.append("## Sections that failed or were skipped")
        lines.append("")
        for k, v in report["errors"].items():
            lines.append(f"- {k}: {v.strip().splitlines()[-1] if v.strip() else v}")
    return "\n".join(lines) + "\n"


def _targets(timing):
    """Per fused row: the figures the issue's targets are about, and whether each is met.

    Bandwidth is judged against the large copy (the card's ceiling); the same-bytes copy is in
    the timing table, for small steps where launch and tail effects dominate both."""
    out = []
    for r in timing:
        if r.get("impl") not in ("triton", "cuda") or "time_us" not in r:
            continue
        row = {k: r.get(k) for k in ("shape", "batch", "dtype", "impl")}
        row["bandwidth_vs_copy"] = r.get("vs_copy_peak")
        row["meets_80pct"] = r.get("vs_copy_peak", 0) >= 0.8
        row["speedup_vs_eager"] = r.get("speedup_vs_eager")
        row["meets_3x"] = (r.get("speedup_vs_eager") or 0) >= 3
        if r.get("speedup_vs_compile") is not None:
            row["speedup_vs_compile"] = r["speedup_vs_compile"]
            row["meets_compile"] = r["speedup_vs_compile"] >= 1
        out.append(row)
    return out


def _worst(rows):
    worst = {}
    for r in rows:
        if "net_in" not in r:
            continue
        key = (r["impl"], r["dtype"])
        score = max(r["net_in"], r["loss"], r["grad"])
        if key not in worst or score > max(worst[key]["net_in"], worst[key]["loss"], worst[key]["grad"]):
            worst[key] = r
    return list(worst.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON report path (a .md table is written beside it)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="toy sizes (CPU plumbing check)")
    ap.add_argument("--impls", default="triton,cuda", help="comma list of fused implementations to check")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--no-share", action="store_true", help="skip the training-step share")
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip sections past this many seconds")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    report = Report(args.budget_s, args.out)
    report.run("environment", environment, device)
    wanted = [i.strip() for i in args.impls.split(",") if i.strip()]
    if "cuda" in wanted and device.type != "cuda":
        wanted.remove("cuda")
        report.data["errors"]["cuda (skipped)"] = "skipped: impl 'cuda' needs a CUDA device"
    # The CUDA build (a minute of nvcc and g++) runs in a thread while Triton is checked.
    cuda_build = BackgroundBuild() if "cuda" in wanted else None
    impls, builds = [], []
    report.data["sections"]["build"] = builds          # filled in as builds finish
    for impl in wanted:
        if impl == "cuda":
            report.run("wait for the cuda build", cuda_build.wait, report.left())
        b = report.run(f"build {impl}", build, impl, device)
        if b is None:
            continue
        if impl == "cuda":
            b["compile_s"] = cuda_build.seconds
        impls.append(impl)
        builds.append(b)
        report.run(f"verify {impl}", verify, impl, device, args.quick, need_s=10)
        report.run(f"verify noise {impl}", verify_noise, impl, device, args.quick, need_s=3)
    measure = timer(device)
    # Most important first: a cut budget loses the last rows, and torch.compile (~20 s a shape)
    # is dropped before the fused and eager timings are.
    for name, batch, shape, with_compile in (TIMED_QUICK if args.quick else TIMED):
        compile_ref = with_compile and not args.no_compile and report.left() > 60
        report.run(f"time {name} batch {batch}", time_shape, name, batch, shape, torch.float32, impls,
                   device, measure, compile_ref, args.quick, need_s=8)
    if not args.quick:
        report.run("time ddpmpp-32x32 batch 512 bf16", time_shape, "ddpmpp-32x32", 512, (3, 32, 32),
                   torch.bfloat16, impls, device, measure, False, args.quick, need_s=8)
    if not args.no_share:
        report.run("share", step_share, impls, device, measure, args.quick, need_s=20)
    print(report.save(), flush=True)
    checks = [r for k, v in report.data["sections"].items() if k.startswith("verify") for r in (v or [])]
    return 0 if checks and all(r.get("ok") for r in checks) and not any(
        k.startswith(("verify", "build")) for k in report.data["errors"]) else 1


if __name__ == "__main__":
    sys.exit(main())
