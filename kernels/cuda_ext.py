"""Build the CUDA implementation of the two-branch kernels on first use, and call it.

    kernels/cuda/two_branch.cu            the kernels and their launchers (CUDA headers only)
    kernels/cuda/two_branch_bindings.cpp  tensor checks and the Python module (PyTorch headers)

`load()` compiles both with torch.utils.cpp_extension.load into a per-user cache
($AMBIENT_DIST_KERNEL_CACHE, else $XDG_CACHE_HOME/ambient_dist/kernels, else
~/.cache/ambient_dist/kernels). The module name carries a hash of the sources and of the
PyTorch/CUDA versions, so an edited source or a new PyTorch builds afresh instead of loading a
stale library; ranks that start together wait on PyTorch's build lock rather than race (the
ninja-free build gives each process a private directory and moves the library in atomically).
Build ahead of time (e.g. at install, where nvcc is present):
`python -m ambient_dist.kernels.cuda_ext`.

Without ninja (which torch's load() requires), `build_without_ninja` runs the same three
compiler steps by hand.

`available()` says whether the build works here (no CUDA device, no nvcc or a compiler error:
False, with the reason given once as a warning), which is how kind "auto" decides.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import torch

from .philox import PhiloxNoise

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
KERNEL_SOURCE = SOURCE_DIR / "two_branch.cu"
BINDINGS_SOURCE = SOURCE_DIR / "two_branch_bindings.cpp"
HEADER = SOURCE_DIR / "two_branch.h"
CUDA_STORAGE = (torch.float32, torch.bfloat16, torch.float16)

_module = None
_build_error: str | None = None
_warned = False


def cache_dir() -> Path:
    root = os.environ.get("AMBIENT_DIST_KERNEL_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "ambient_dist" / "kernels"


def build_name() -> str:
    """Extension name: a hash of the sources and of the toolchain they are built against."""
    h = hashlib.sha256()
    for path in (KERNEL_SOURCE, BINDINGS_SOURCE, HEADER):
        h.update(path.read_bytes())
    h.update(f"{torch.__version__}/{torch.version.cuda}/{sys.version_info[:2]}".encode())
    return f"ambient_two_branch_{h.hexdigest()[:12]}"


def find_nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def nvcc_compile_command(output: str | os.PathLike, arch: str = "sm_90") -> list[str]:
    """nvcc command compiling the kernel source alone to an object (the CPU compile-only test)."""
    nvcc = find_nvcc() or "nvcc"
    return [nvcc, "-c", str(KERNEL_SOURCE), "-o", str(output), "-std=c++17", "-O3",
            f"-arch={arch}", "-Xcompiler", "-fPIC", f"-I{SOURCE_DIR}"]


def load(verbose: bool = False):
    """The compiled extension module; raises RuntimeError saying why it cannot be built here."""
    global _module, _build_error
    if _module is not None:
        return _module
    if _build_error is not None:
        raise RuntimeError(_build_error)
    if not torch.cuda.is_available():
        _build_error = f"impl 'cuda': no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda})"
        raise RuntimeError(_build_error)
    if find_nvcc() is None:
        _build_error = "impl 'cuda': nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        raise RuntimeError(_build_error)
    build_dir = cache_dir() / build_name()
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils.cpp_extension import is_ninja_available
        if is_ninja_available():
            from torch.utils.cpp_extension import load as cpp_load
            _module = cpp_load(name=build_dir.name, sources=[str(BINDINGS_SOURCE), str(KERNEL_SOURCE)],
                               extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"],
                               extra_include_paths=[str(SOURCE_DIR)], build_directory=str(build_dir),
                               verbose=verbose)
        else:
            _module = build_without_ninja(build_dir, arch_flags(), verbose)
    except Exception as e:  # a compiler error arrives as RuntimeError/OSError/CalledProcessError
        _build_error = f"impl 'cuda': building {KERNEL_SOURCE.name} in {build_dir} failed: {e}"
        raise RuntimeError(_build_error) from e
    return _module


def arch_flags() -> list[str]:
    """-gencode for the visible GPU (or $TORCH_CUDA_ARCH_LIST's first entry)."""
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(";", " ").split()
    if listed:
        major, minor = listed[0].split("+")[0].split(".")
    else:
        major, minor = (str(v) for v in torch.cuda.get_device_capability())
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]


def _run(cmd: list[str], verbose: bool) -> None:
    if verbose:
        print(" ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def build_without_ninja(build_dir: Path, gencode: list[str], verbose: bool = False):
    """What torch.utils.cpp_extension.load does, for machines without ninja (it requires it):
    nvcc for the kernels, the C++ compiler for the bindings, one shared library, imported."""
    from torch.utils import cpp_extension as ce
    name = build_dir.name
    library = build_dir / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not library.exists():
        # Objects and the library are made in a private directory and moved in at the end, so
        # ranks building at once never read each other's half-written files.
        work = build_dir / f"tmp-{os.getpid()}"
        work.mkdir(parents=True, exist_ok=True)
        nvcc = find_nvcc()
        cxx = os.environ.get("CXX", "c++")
        includes = [f"-I{p}" for p in ce.include_paths("cuda")] + [
            f"-I{sysconfig.get_paths()['include']}", f"-I{SOURCE_DIR}"]
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
        kernel_obj, bindings_obj = work / "two_branch.cuda.o", work / "two_branch_bindings.o"
        _run([nvcc, "-c", str(KERNEL_SOURCE), "-o", str(kernel_obj), "-O3", "-lineinfo", "-std=c++17",
              "-Xcompiler", "-fPIC", f"-I{SOURCE_DIR}", abi, *gencode], verbose)
        _run([cxx, "-c", str(BINDINGS_SOURCE), "-o", str(bindings_obj), "-O3", "-std=c++20", "-fPIC",
              *includes, abi, f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H"], verbose)
        libs = ce.library_paths("cuda")
        _run([cxx, "-shared", str(bindings_obj), str(kernel_obj), "-o", str(work / library.name),
              *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs],
              "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", "-lcudart"], verbose)
        os.replace(work / library.name, library)
        shutil.rmtree(work, ignore_errors=True)
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def available() -> bool:
    """True if the extension builds and loads here; warns once with the reason if not."""
    global _warned
    try:
        load()
    except RuntimeError as e:
        if not _warned and torch.cuda.is_available():
            warnings.warn(f"{e}; falling back to Triton", RuntimeWarning, stacklevel=2)
            _warned = True
        return False
    return True


def _storage(name: str, t: torch.Tensor) -> torch.Tensor:
    # Every tensor has its own storage type in the kernels (float16 noisy copies beside float32
    # images are read as they are); only float64 is left to Triton and the reference.
    if t.dtype not in CUDA_STORAGE:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported by impl 'cuda' "
                        "(float32, bfloat16, float16); use 'triton' or 'reference' for float64")
    return t


class CudaBackend:
    """The extension behind the backend interface of fused.py ([B, N] views)."""

    def __init__(self, module) -> None:
        self.module = module

    def network_input(self, p, q, c_in, ambient, clean, noisy, eps, out_dtype, block=None):
        clean = _storage("clean", clean)
        noisy = _storage("noisy", noisy)
        seeded = isinstance(eps, PhiloxNoise)
        if seeded:
            key_lo, key_hi = eps.key()
            step_lo, step_hi = eps.step_words()
            first, eps_arg = eps.first_sample, clean          # not read when seeded
        else:
            key_lo = key_hi = step_lo = step_hi = first = 0
            eps_arg = _storage("eps", eps)
        if out_dtype not in CUDA_STORAGE:
            raise TypeError(f"out_dtype: {out_dtype} is not supported by impl 'cuda' "
                            "(float32, bfloat16, float16)")
        out = torch.empty(clean.shape, dtype=out_dtype, device=clean.device)
        with torch.cuda.device(clean.device):
            stream = torch.cuda.current_stream(clean.device).cuda_stream
            return self.module.network_input(clean, noisy, eps_arg, out, p.float(), q.float(),
                                             c_in.float(), ambient, seeded, first, step_lo,
                                             step_hi, key_lo, key_hi, stream)

    def residual_loss(self, a, b, c, c_in, weight, ambient, f, net_in, clean, noisy,
                      grad_scale, write_grad, deterministic, block=None):
        f = _storage("F", f)
        clean = _storage("clean", clean)
        noisy = _storage("noisy", noisy)
        net_in = _storage("net_in", net_in)
        with torch.cuda.device(f.device):
            stream = torch.cuda.current_stream(f.device).cuda_stream
            loss, grad = self.module.residual_loss(f, net_in, clean, noisy, a.float(), b.float(),
                                                   c.float(), c_in.float(), weight.float(), ambient,
                                                   float(grad_scale), bool(write_grad),
                                                   bool(deterministic), stream)
        return loss, (grad if write_grad else None)

    def rescale_rows(self, grad, upstream, expected, in_place, block=None):
        with torch.cuda.device(grad.device):
            stream = torch.cuda.current_stream(grad.device).cuda_stream
            return self.module.rescale_rows(grad, upstream.float().contiguous(), float(expected),
                                            bool(in_place), stream)


_backend: CudaBackend | None = None


def load_backend() -> CudaBackend:
    global _backend
    if _backend is None:
        _backend = CudaBackend(load())
    return _backend


if __name__ == "__main__":
    # Build ahead of time: `python -m ambient_dist.kernels.cuda_ext` (prints where the library went).
    mod = load(verbose="-v" in sys.argv)
    print(f"built {mod.__name__} in {cache_dir() / build_name()}")
