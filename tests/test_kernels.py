"""The fused two-branch kernels (ambient_dist.kernels, the kernels/ folder) against the PyTorch
reference of ambient_dist.objective, through the objective's two-pass protocol.

Two halves:
- In this process: the selection on a CPU, the Philox noise definition (known-answer
  vectors, batch-split invariance), the reference path, the CUDA source compiling with nvcc,
  and (in a child without the interpreter) the Triton kernels compiling to sm_90 PTX.
- In ONE child process with TRITON_INTERPRET=1: the Triton kernels themselves. `triton.jit`
  decides between compiled and interpreted when kernels/triton_two_branch.py is imported, so
  the interpreter must be on before that import; a child process keeps the setting away from
  every other test module, whatever order pytest collects them in. The child runs each case
  registered with @triton_case and reports per case; `test_triton_interpreted` asserts each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

from ambient_dist.kernels import FusedKernel, PhiloxNoise, philox_normal
from ambient_dist.kernels.philox import philox4x32
from ambient_dist.models.precond import EDMPrecond
from ambient_dist.objective import (REFERENCE, KernelChoiceError, TwoBranchKernel,
                                    edm_coefficients, select_kernel)

REPO = Path(__file__).resolve().parent.parent
SIGMA_TN = 0.5


# --------------------------------------------------------------------------------------
# Shared inputs
# --------------------------------------------------------------------------------------

class TinyUNet(nn.Module):
    """A stand-in U-Net for EDMPrecond: one conv, conditioned on c_noise."""

    def __init__(self, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, c_noise, labels=None, augment_labels=None):
        return self.conv(x) * (1 + c_noise.reshape(-1, 1, 1, 1))


def make_net(channels=3, seed=0):
    torch.manual_seed(seed)
    return EDMPrecond(TinyUNet(channels), img_resolution=8, img_channels=channels, label_dim=0)


def sigmas_for(mix: str, batch: int, g: torch.Generator) -> torch.Tensor:
    """Noise levels giving an all-clean, all-ambient or mixed batch; 'edge' puts sigma at sigma_tn."""
    clean = SIGMA_TN * (0.05 + 0.9 * torch.rand(batch, generator=g))
    noisy = SIGMA_TN * (1.0 + 20.0 * torch.rand(batch, generator=g))
    if mix == "clean":
        return clean
    if mix == "ambient":
        return noisy
    sigma = torch.where(torch.arange(batch) % 2 == 0, clean, noisy)
    if mix == "edge":
        sigma[0] = SIGMA_TN           # exactly at the threshold: ambient with a = 0
    return sigma


def problem(mix="mixed", batch=4, shape=(3, 5, 7), dtype=torch.float32, seed=0):
    """(coefs, clean, noisy, eps, F) with the EDM coefficients the training step uses."""
    g = torch.Generator().manual_seed(seed)
    sigma = sigmas_for(mix, batch, g)
    ambient = sigma >= SIGMA_TN
    coefs = edm_coefficients(make_net(shape[0]), sigma, ambient, SIGMA_TN, 0.5)
    clean = torch.rand(batch, *shape, generator=g) * 2 - 1
    noisy = clean + SIGMA_TN * torch.randn(batch, *shape, generator=g)
    eps = torch.randn(batch, *shape, generator=g)
    F = torch.randn(batch, *shape, generator=g)
    return coefs, clean.to(dtype), noisy.to(dtype), eps.to(dtype), F.to(dtype)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def reference_loss_and_grad(coefs, F, net_in, clean, noisy, weights=None):
    """Per-sample loss and dF by autograd of the reference, in float64."""
    F64 = F.detach().double().requires_grad_()
    loss = REFERENCE.residual_loss(coefs, F64, net_in.double(), clean.double(), noisy.double())
    upstream = torch.full_like(loss, 1.0 / loss.numel()) if weights is None else weights.double()
    (grad,) = torch.autograd.grad(loss, F64, upstream)
    return loss.detach(), grad


# --------------------------------------------------------------------------------------
# In-process tests
# --------------------------------------------------------------------------------------

def test_selection_on_cpu(monkeypatch):
    # (Under the interpreter "triton" gives a FusedKernel: the child-process case below.)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from ambient_dist import kernels
    assert select_kernel("auto", "cpu") is REFERENCE
    assert kernels.fused_kernel("auto", torch.device("cpu")) is REFERENCE
    with pytest.raises(KernelChoiceError, match="objective.kernel: 'cuda' needs a CUDA device"):
        select_kernel("cuda", "cpu")
    if kernels._triton_importable():
        with pytest.raises(KernelChoiceError, match="objective.kernel: 'triton' needs a CUDA device"):
            select_kernel("triton", "cpu")
    with pytest.raises(KernelChoiceError, match="objective.kernel: 'fast' is not one of"):
        select_kernel("fast", "cpu")
    with pytest.raises(KernelChoiceError, match="'reference' is not a fused kernel"):
        kernels.fused_kernel("reference", "cpu")


def test_cuda_extension_reports_why_it_is_unavailable():
    from ambient_dist.kernels import cuda_ext
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; the GPU check covers the build")
    assert cuda_ext.available() is False
    with pytest.raises(RuntimeError, match="impl 'cuda': no CUDA device"):
        cuda_ext.load()
    assert cuda_ext.build_name().startswith("ambient_two_branch_")


def test_philox_known_answer_vectors():
    # Philox-4x32-10 known-answer vectors of the Random123 distribution (kat_vectors).
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in cases:
        words = philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
        assert tuple(int(w) for w in words) == expected


def test_philox_noise_is_normal_and_independent_of_the_batch_split():
    noise = PhiloxNoise(seed=2 ** 40 + 7, step=3, first_sample=10)
    whole = philox_normal(noise, batch=6, numel=999)
    first = philox_normal(PhiloxNoise(noise.seed, noise.step, 10), batch=2, numel=999)
    rest = philox_normal(PhiloxNoise(noise.seed, noise.step, 12), batch=4, numel=999)
    assert torch.equal(whole, torch.cat([first, rest]))
    assert whole.shape == (6, 999) and torch.isfinite(whole).all()
    assert abs(float(whole.mean())) < 0.05 and abs(float(whole.std()) - 1) < 0.05
    # Different step, seed or sample: different noise.
    assert not torch.equal(whole, philox_normal(PhiloxNoise(noise.seed, 4, 10), 6, 999))
    assert not torch.equal(whole, philox_normal(PhiloxNoise(noise.seed + 1, 3, 10), 6, 999))
    assert not torch.equal(whole[1], whole[0])
    with pytest.raises(ValueError, match="PhiloxNoise.seed"):
        PhiloxNoise(seed=-1, step=0)


def test_reference_passes_compose_and_take_philox_noise():
    coefs, clean, noisy, eps, _ = problem("mixed")
    net = make_net()
    # loss() is pass 1, one network call, pass 2 (with pass 1's exact x_in).
    net_in = REFERENCE.network_input(coefs, clean, noisy, eps)
    by_passes = REFERENCE.residual_loss(coefs, net.raw(net_in, coefs.c_noise), net_in, clean, noisy)
    composed = REFERENCE.loss(net.raw, coefs, clean, noisy, eps)
    assert rel_err(composed, by_passes) < 1e-6
    noise = PhiloxNoise(seed=5, step=1)
    seeded = REFERENCE.network_input(coefs, clean, noisy, noise)
    assert torch.equal(seeded, REFERENCE.network_input(coefs, clean, noisy, noise.normal_like(clean)))
    assert torch.equal(noise.normal_like(clean), philox_normal(noise, 4, clean[0].numel()).reshape(clean.shape))


def test_reference_gradcheck_float64():
    coefs, clean, noisy, _, F = problem("edge", batch=3, shape=(2, 2, 3), dtype=torch.float64)
    net_in = clean * 0.3
    F = F.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f: REFERENCE.residual_loss(coefs, f, net_in, clean, noisy), (F,))


def test_cuda_source_compiles_with_nvcc(tmp_path):
    from ambient_dist.kernels import cuda_ext
    if cuda_ext.find_nvcc() is None:
        pytest.skip("nvcc not found on this machine: the CUDA source is compiled by the GPU check")
    # Compile-only: the kernels and launchers need CUDA headers alone, not PyTorch's CUDA build.
    cmd = cuda_ext.nvcc_compile_command(tmp_path / "two_branch.o", arch="sm_90")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "two_branch.o").stat().st_size > 0


AOT_TRITON = r"""
import re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import ambient_dist.kernels.triton_two_branch as K
f32, target = "*fp32", GPUTarget("cuda", 90, 32)

def ptx(fn, sig, const, aligned):
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=target).asm["ptx"]

ints = dict(numel="i32", first_sample="i32", step_lo="i32", step_hi="i32", key_lo="i64", key_hi="i32")
pass1 = dict(clean_ptr=f32, noisy_ptr="*fp16", eps_ptr=f32, out_ptr=f32, p_ptr=f32, q_ptr=f32,
             c_in_ptr=f32, ambient_ptr="*u8", **ints, BLOCK="constexpr", SEEDED_NOISE="constexpr",
             COMPUTE="constexpr")
pass2 = dict(f_ptr=f32, net_in_ptr=f32, clean_ptr=f32, noisy_ptr="*fp16", grad_ptr=f32, loss_ptr=f32,
             a_ptr=f32, b_ptr=f32, c_ptr=f32, c_in_ptr=f32, weight_ptr=f32, ambient_ptr="*u8", numel="i32",
             blocks_per_sample="i32", grad_scale="fp32", BLOCK="constexpr", WRITE_GRAD="constexpr",
             DETERMINISTIC="constexpr", COMPUTE="constexpr")
rescale = dict(grad_ptr=f32, out_ptr=f32, upstream_ptr=f32, expected="fp32", numel="i32",
               BLOCK="constexpr", IN_PLACE="constexpr", COMPUTE="constexpr")
out = {}
for seeded in (False, True):
    out[f"pass1 seeded={seeded}"] = ptx(K._network_input_kernel, pass1,
        dict(BLOCK=1024, SEEDED_NOISE=seeded, COMPUTE=tl.float32),
        ["clean_ptr", "noisy_ptr", "eps_ptr", "out_ptr", "numel"])
for det in (False, True):
    out[f"pass2 deterministic={det}"] = ptx(K._residual_loss_kernel, pass2,
        dict(BLOCK=1024, WRITE_GRAD=True, DETERMINISTIC=det, COMPUTE=tl.float32),
        ["f_ptr", "net_in_ptr", "clean_ptr", "noisy_ptr", "grad_ptr", "numel"])
for in_place in (False, True):
    out[f"rescale in_place={in_place}"] = ptx(K._rescale_rows_kernel, rescale,
        dict(BLOCK=1024, IN_PLACE=in_place, COMPUTE=tl.float32), ["grad_ptr", "out_ptr", "numel"])
for name, text in out.items():
    wide = bool(re.search(r"ld\.global(\.nc)?\.v4\.b32", text)) and "st.global.v4.b32" in text
    print(f"{name}: wide={wide} mulhi={text.count('mul.hi')}")
"""


def test_triton_kernels_compile_for_a_gpu_without_one():
    # Compiled mode (not the interpreter): Triton lowers the kernels to PTX for sm_90 on a CPU
    # machine. Catches constructs the interpreter accepts but the compiler does not, and checks
    # the aligned case gets 16-byte loads and stores. Own process: no TRITON_INTERPRET there.
    pytest.importorskip("triton", reason="the triton package is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", AOT_TRITON], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = dict(line.split(": ", 1) for line in done.stdout.strip().splitlines())
    assert len(report) == 6 and all("wide=True" in v for v in report.values()), report
    # In-kernel noise: about 20 high multiplies per Philox call, one call per 4 elements.
    assert "mulhi=0" in report["pass1 seeded=False"] and "mulhi=0" not in report["pass1 seeded=True"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_fused_kernels_on_gpu(impl):
    # CPU twins: the interpreted Triton cases below and gpu_check_script_runs_at_toy_size.
    from ambient_dist.kernels import gpu_check
    rows = gpu_check.verify(impl, torch.device("cuda"), quick=False)
    rows += gpu_check.verify_noise(impl, torch.device("cuda"), quick=False)
    bad = [r for r in rows if not r["ok"]]
    assert rows and not bad, bad[:3]


def test_cpu_benchmark_gives_harness_results(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))          # benchmarks/ is not an installed package
    from benchmarks.harness import RESULT_KEYS, Context
    from benchmarks.bench_kernels import run
    rows = run(Context(device="cpu", quick=True))
    assert len(rows) == 1 and all(k in rows[0] for k in RESULT_KEYS)
    assert rows[0]["ours"] > 0 and rows[0]["baseline"] > 0 and rows[0]["ratio"] > 0
    assert rows[0]["impl"] == "reference"


# --------------------------------------------------------------------------------------
# Triton under the interpreter: cases run in one child process
# --------------------------------------------------------------------------------------

TRITON_CASES: dict = {}


def triton_case(fn):
    TRITON_CASES[fn.__name__] = fn
    return fn


def triton() -> FusedKernel:
    """The Triton implementation, as objective.kernel='triton' selects it (interpreter on)."""
    return select_kernel("triton", "cpu")


@triton_case
def selection_returns_the_triton_object():
    kernel = triton()
    assert isinstance(kernel, FusedKernel) and isinstance(kernel, TwoBranchKernel)
    assert kernel.name == "triton" and callable(kernel.loss)
    assert select_kernel("auto", "cpu") is REFERENCE       # auto never interprets on a CPU


@triton_case
def forward_and_gradient_fp32_every_branch_mix():
    for mix in ("clean", "ambient", "mixed", "edge"):
        coefs, clean, noisy, eps, F = problem(mix)
        net_in = triton().network_input(coefs, clean, noisy, eps)
        ref_in = REFERENCE.network_input(coefs, clean.double(), noisy.double(), eps.double())
        assert net_in.dtype == torch.float32 and rel_err(net_in, ref_in) < 1e-5, mix
        Fg = F.clone().requires_grad_()
        loss = triton().residual_loss(coefs, Fg, net_in, clean, noisy)
        ref_loss, ref_grad = reference_loss_and_grad(coefs, F, net_in, clean, noisy)
        assert rel_err(loss, ref_loss) < 1e-5, (mix, rel_err(loss, ref_loss))
        loss.mean().backward()
        assert rel_err(Fg.grad, ref_grad) < 1e-5, (mix, rel_err(Fg.grad, ref_grad))
        if mix == "edge":   # sigma at sigma_tn: ambient with a = 0, so no gradient reaches F
            assert bool(coefs.ambient[0]) and float(coefs.A[0]) == 0.0
            assert torch.all(Fg.grad[0] == 0) and float(loss[0].detach()) > 0


@triton_case
def forward_bf16_within_1e_2():
    coefs, clean, noisy, eps, F = problem("mixed", dtype=torch.bfloat16, shape=(3, 8, 8))
    net_in = triton().network_input(coefs, clean, noisy, eps)
    assert net_in.dtype == torch.bfloat16
    ref_in = REFERENCE.network_input(coefs, clean.double(), noisy.double(), eps.double())
    assert rel_err(net_in, ref_in) < 1e-2
    Fg = F.clone().requires_grad_()
    loss = triton().residual_loss(coefs, Fg, net_in, clean, noisy)
    assert loss.dtype == torch.float32         # accumulated in float32 whatever the storage
    ref_loss, ref_grad = reference_loss_and_grad(coefs, F, net_in, clean, noisy)
    assert rel_err(loss, ref_loss) < 1e-2
    loss.mean().backward()
    assert Fg.grad.dtype == torch.bfloat16 and rel_err(Fg.grad, ref_grad) < 1e-2
    # float16 noisy copies beside float32 images (as the loader stores them): read as they are.
    coefs, clean, noisy, eps, F = problem("mixed")
    noisy16 = noisy.half()
    net_in = triton().network_input(coefs, clean, noisy16, eps)
    assert net_in.dtype == torch.float32
    assert rel_err(net_in, REFERENCE.network_input(coefs, clean, noisy16.float(), eps)) < 1e-5
    loss = triton().residual_loss(coefs, F, net_in, clean, noisy16)
    assert rel_err(loss, REFERENCE.residual_loss(coefs, F, net_in, clean, noisy16.float())) < 1e-5
    # bfloat16 network input from float32 images (autocast-style), without a separate cast.
    coefs, clean, noisy, eps, _ = problem("mixed")
    net_bf = triton().network_input(coefs, clean, noisy, eps, out_dtype=torch.bfloat16)
    assert net_bf.dtype == torch.bfloat16
    assert rel_err(net_bf, REFERENCE.network_input(coefs, clean, noisy, eps)) < 1e-2


@triton_case
def batch_of_one_and_sizes_not_multiple_of_the_block():
    for batch, shape, block in ((1, (3, 5, 7), None), (1, (1, 1, 1), None), (3, (3, 5, 7), 16),
                                (2, (1, 13, 3), 8)):
        coefs, clean, noisy, eps, F = problem("mixed", batch=batch, shape=shape, seed=batch)
        net_in = triton().network_input(coefs, clean, noisy, eps, block=block)
        assert rel_err(net_in, REFERENCE.network_input(coefs, clean, noisy, eps)) < 1e-5
        for deterministic in (False, True):
            Fg = F.clone().requires_grad_()
            loss = triton().residual_loss(coefs, Fg, net_in, clean, noisy,
                                         deterministic=deterministic, block=block)
            ref_loss, ref_grad = reference_loss_and_grad(coefs, F, net_in, clean, noisy)
            assert rel_err(loss, ref_loss) < 1e-5, (batch, shape, block, deterministic)
            loss.mean().backward()
            assert rel_err(Fg.grad, ref_grad) < 1e-5


@triton_case
def deterministic_reduction_is_reproducible_and_agrees_with_atomics():
    coefs, clean, noisy, eps, F = problem("mixed", batch=3, shape=(3, 16, 16))
    net_in = triton().network_input(coefs, clean, noisy, eps)
    runs = [triton().residual_loss(coefs, F, net_in, clean, noisy, deterministic=True, block=64)
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    atomic = triton().residual_loss(coefs, F, net_in, clean, noisy, deterministic=False, block=64)
    assert rel_err(atomic, runs[0]) < 1e-5
    assert rel_err(runs[0], REFERENCE.residual_loss(coefs, F, net_in, clean, noisy)) < 1e-5


@triton_case
def gradient_for_any_upstream_weighting():
    # The kernel writes dF for loss.mean(); a sum, a loss scale or per-sample weights rescale it.
    coefs, clean, noisy, eps, F = problem("mixed")
    net_in = triton().network_input(coefs, clean, noisy, eps)
    for upstream in (torch.ones(4), torch.tensor([0.5, -2.0, 0.0, 3.0]), torch.full((4,), 1024.0 / 4)):
        Fg = F.clone().requires_grad_()
        loss = triton().residual_loss(coefs, Fg, net_in, clean, noisy)
        loss.backward(upstream)
        _, ref_grad = reference_loss_and_grad(coefs, F, net_in, clean, noisy, weights=upstream)
        assert rel_err(Fg.grad, ref_grad) < 1e-5
    # A pre-selected source tensor instead of (clean, noisy).
    src = torch.where(coefs.ambient.reshape(-1, 1, 1, 1), noisy, clean)
    one = triton().residual_loss(coefs, F, net_in, src, None)
    assert rel_err(one, REFERENCE.residual_loss(coefs, F, net_in, clean, noisy)) < 1e-5


class RescaleSpy:
    """The Triton backend, recording for each backward() whether rescale_rows changed dF."""

    def __init__(self):
        import ambient_dist.kernels.triton_two_branch as K
        self.K, self.changed = K, []
        self.network_input, self.residual_loss = K.network_input, K.residual_loss

    def rescale_rows(self, grad, upstream, expected, in_place, block=None):
        before = grad.clone()
        out = self.K.rescale_rows(grad, upstream, expected, in_place, block)
        self.changed.append(not (out is grad and torch.equal(out, before)))
        return out


@triton_case
def backward_scale_is_written_in_the_forward_pass():
    # The trainer passes backward_scale = 1/accumulation and scales the mean by it (plain
    # torch multiplies, DeepSpeed divides by the step count): dF is then s times dF at s = 1,
    # and backward() hands the buffer on unchanged -- no rescaling pass.
    coefs, clean, noisy, eps, F = problem("mixed", batch=6, shape=(3, 5, 7))
    spy = RescaleSpy()
    kernel = FusedKernel("triton", spy)
    net_in = kernel.network_input(coefs, clean, noisy, eps)

    def grad(backward_scale, caller):
        Fg = F.clone().requires_grad_()
        loss = kernel.residual_loss(coefs, Fg, net_in, clean, noisy, backward_scale=backward_scale)
        caller(loss.mean()).backward()
        return loss.detach(), Fg.grad
    loss_1, grad_1 = grad(1.0, lambda m: m)
    for k in (3, 4, 7):
        for caller in (lambda m: m * (1.0 / k), lambda m: m / k):
            loss_s, grad_s = grad(1.0 / k, caller)
            assert torch.equal(loss_s, loss_1)                       # the value is not scaled
            assert rel_err(grad_s, grad_1 / k) < 1e-6, (k, rel_err(grad_s, grad_1 / k))
            assert spy.changed[-1] is False, k                       # no pass over dF
    assert spy.changed[0] is False                                   # s = 1: loss.mean()
    # Unannounced (the scale applied by the caller only): still exact, at the cost of the pass.
    _, grad_late = grad(1.0, lambda m: m / 3)
    assert spy.changed[-1] is True and rel_err(grad_late, grad_1 / 3) < 1e-6


@triton_case
def gradcheck_float64_through_the_kernel():
    # float64 inputs run the kernel in float64, so gradcheck's finite differences are exact enough.
    coefs, clean, noisy, eps, F = problem("edge", batch=3, shape=(2, 1, 3), dtype=torch.float64)
    net_in = triton().network_input(coefs, clean, noisy, eps)
    assert net_in.dtype == torch.float64
    assert rel_err(net_in, REFERENCE.network_input(coefs, clean, noisy, eps)) < 1e-12
    F = F.requires_grad_()
    # gradcheck runs backward once per output through one graph: keep dF (retain_grad_buffer).
    assert torch.autograd.gradcheck(
        lambda f: triton().residual_loss(coefs, f, net_in, clean, noisy, block=4,
                                        retain_grad_buffer=True), (F,))
    assert torch.autograd.gradcheck(
        lambda f: triton().residual_loss(coefs, f, net_in, clean, noisy,
                                        retain_grad_buffer=True).mean(), (F,))
    # By default dF is handed on in place, so a second backward must refuse, not mislead.
    loss = triton().residual_loss(coefs, F, net_in, clean, noisy).sum()
    loss.backward(retain_graph=True)
    try:
        loss.backward()
    except RuntimeError as e:
        assert "retain_grad_buffer=True" in str(e)
    else:
        raise AssertionError("a second backward through the in-place gradient did not raise")


@triton_case
def in_kernel_noise_matches_philox_reference_and_batch_split():
    coefs, clean, noisy, _, _ = problem("mixed", batch=4, shape=(3, 5, 7))
    ones, zeros = torch.ones(4), torch.zeros(4)
    coefs.P, coefs.Q, coefs.c_in = zeros, ones, ones          # net_in = eps
    noise = PhiloxNoise(seed=123456789012, step=77, first_sample=5)
    eps = triton().network_input(coefs, clean, noisy, noise, block=16)
    ref = noise.normal_like(clean)
    assert float((eps - ref).abs().max()) < 1e-5
    halves = [triton().network_input(_take(coefs, sl), clean[sl], noisy[sl],
                                     PhiloxNoise(noise.seed, noise.step, 5 + sl.start))
              for sl in (slice(0, 1), slice(1, 4))]
    assert torch.equal(torch.cat(halves), eps)                # same noise, whatever the split
    # And the full pass 1 with drawn noise equals the reference fed the same noise.
    coefs, clean, noisy, _, _ = problem("mixed", batch=4, shape=(3, 5, 7))
    net_in = triton().network_input(coefs, clean, noisy, noise)
    assert rel_err(net_in, REFERENCE.network_input(coefs, clean, noisy, ref)) < 1e-5


def _take(coefs, sl):
    import dataclasses
    return dataclasses.replace(coefs, **{f.name: getattr(coefs, f.name)[sl]
                                         for f in dataclasses.fields(coefs)})


@triton_case
def training_step_through_triton_equals_reference():
    # TwoBranchKernel.loss: pass 1, ONE network call, pass 2; parameter gradients agree.
    net = make_net()
    coefs, clean, noisy, eps, _ = problem("mixed", batch=4, shape=(3, 8, 8))
    grads = {}
    for impl in ("reference", "triton"):
        net.zero_grad()
        loss = select_kernel(impl, "cpu").loss(net.raw, coefs, clean, noisy, eps)
        loss.mean().backward()
        grads[impl] = (loss.detach(), [p.grad.clone() for p in net.parameters()])
    assert rel_err(grads["triton"][0], grads["reference"][0]) < 1e-5
    for ours, ref in zip(grads["triton"][1], grads["reference"][1]):
        assert rel_err(ours, ref) < 1e-4


@triton_case
def bad_inputs_are_named():
    coefs, clean, noisy, eps, F = problem("mixed")
    for call, message in (
            (lambda: triton().network_input(coefs, clean, noisy[:2], eps), "noisy: shape"),
            (lambda: triton().network_input(_take(coefs, slice(0, 2)), clean, noisy, eps),
             r"coefs.P: shape \(2,\)"),
            (lambda: triton().residual_loss(coefs, F.int(), clean, clean, noisy), "F: dtype"),
            (lambda: triton().residual_loss(coefs, F, clean, clean, noisy, backward_scale=0.0),
             "backward_scale: must be a finite number > 0")):
        try:
            call()
        except (ValueError, TypeError) as e:
            import re
            assert re.search(message, str(e)), (message, str(e))
        else:
            raise AssertionError(f"no error for {message}")


@triton_case
def gpu_check_script_runs_at_toy_size():
    # The GPU check's plumbing (sections, tables, JSON) at toy sizes, Triton interpreted.
    import tempfile
    from ambient_dist.kernels import gpu_check
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "check.json"
        status = gpu_check.main(["--quick", "--device", "cpu", "--impls", "triton,cuda", "--no-compile",
                                 "--no-share", "--out", str(out)])
        report = json.loads(out.read_text())
        table = out.with_suffix(".md").read_text()
    assert status == 0, report["errors"]
    checks = report["sections"]["verify triton"] + report["sections"]["verify noise triton"]
    assert checks and all(r["ok"] for r in checks)
    assert "cuda (skipped)" in report["errors"]
    assert any(r["impl"] == "triton" and r["time_us"] > 0 for r in report["sections"]["time toy-3x8x8 batch 4"])
    assert "checks within tolerance" in table and "| triton |" in table


def _run_triton_cases() -> dict:
    """Child process entry: run every case, return {name: 'ok' or the traceback}."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import ambient_dist.kernels.triton_two_branch as ttb
    assert ttb._interpreted(), "the Triton kernels were not defined under the interpreter"
    results = {}
    for name, fn in TRITON_CASES.items():
        try:
            fn()
            results[name] = "ok"
        except Exception:  # report every case, not only the first failure
            results[name] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def triton_results():
    pytest.importorskip("triton", reason="the triton package is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, __file__, "--triton-cases"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=900)
    marker = "TRITON-CASES-JSON:"
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(marker)]
    assert done.returncode == 0 and lines, f"child failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return json.loads(lines[-1][len(marker):])


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_interpreted(case, triton_results):
    assert triton_results.get(case) == "ok", triton_results.get(case, "case did not run")


if __name__ == "__main__" and "--triton-cases" in sys.argv:
    torch.manual_seed(0)
    print("TRITON-CASES-JSON:" + json.dumps(_run_triton_cases()))
