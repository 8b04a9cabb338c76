"""What every benchmark shares: the run's options, a timer, the result record, the machine.

A benchmark module `benchmarks/bench_<name>.py` exposes `run(ctx: Context) -> list[dict]`
and builds each dict with `result(...)`. `benchmarks/run_all.py` finds the modules, runs them
and writes the table and the JSON.

Every figure is a ratio to a baseline measured in the same run on the same machine, because
absolute times drift between machines and runs while side-by-side ratios do not. `ratio` is
oriented so that higher is better for us:

    throughput units (anything per second: img/s, GB/s, TFLOP/s)   ratio = ours / baseline
    time units (s, ms, us, and s/step, ms/img, ...)                 ratio = baseline / ours
    size units (bytes, MB, GB, GB/step, ...)                         ratio = baseline / ours

so `ratio = 2.0` always means "we are twice as good as the baseline". A unit outside these
families needs `higher_is_better=` stated by the caller (result() refuses to guess).

Timing: `measure` calls the function `warmup` times untimed, then `repeats` times timed. On
CUDA each repeat is bracketed by CUDA events and the device is synchronized before reading
them (the host returns long before the GPU finishes); on CPU it is `time.perf_counter`.
Figures reported are medians of the repeats; the raw repeats go into the JSON.

torch is imported inside the functions that need it, so that run_all's parent process (and
a benchmark that needs no torch) starts in well under a second; on a GPU run the parent
touches CUDA only to check it is there and to read the card's name and memory.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent


def _torch():
    import torch
    return torch


# Keys every result dict has (run_all.py checks them; tests/test_benchmarks.py too).
RESULT_KEYS = ("name", "unit", "ours", "baseline", "baseline_name", "ratio",
               "higher_is_better", "ours_repeats", "baseline_repeats")


@dataclass
class Context:
    """The options of one suite run, handed to every benchmark's `run(ctx)`.

    quick: the CI size (whole suite on CPU in under 5 minutes; checks the code paths, the
    figures mean little). full: the paper-scale sizes (GPU, minutes per benchmark). Neither:
    the default size, meaningful on a GPU within the run book's 8 minutes.
    """
    device: str = "cpu"          # "cpu" or "cuda"
    quick: bool = False
    full: bool = False
    out: Optional[Path] = None   # where run_all writes the JSON (benchmarks may put files beside it)
    # Set by run_all: where `save_partial` leaves results that survive a timeout or crash.
    partial_path: Optional[Path] = None

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"Context.device: expected 'cpu' or 'cuda', got {self.device!r}")
        if self.quick and self.full:
            raise ValueError("Context: --quick and --full exclude each other")
        if self.device == "cuda" and not _torch().cuda.is_available():
            raise ValueError("Context.device: 'cuda' asked for but torch sees no CUDA device "
                             f"(torch {_torch().__version__})")

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    def size(self, quick: Any, default: Any, full: Any = None) -> Any:
        """Pick a problem size by mode: `ctx.size(quick=8, default=256, full=512)`."""
        if self.quick:
            return quick
        if self.full and full is not None:
            return full
        return default

    def save_partial(self, results: list[dict]) -> None:
        """Hand over the results so far: if the module is then killed (run_all --timeout or
        --budget) or crashes, these are kept in the report beside the error. Optional."""
        if self.partial_path is None:
            return
        from ambient_dist.fileio import atomic_write_json
        atomic_write_json(self.partial_path, {"results": results, "partial": True}, default=str)

    def sync(self) -> None:
        if self.on_gpu:
            _torch().cuda.synchronize()


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

def release_device_memory() -> None:
    """Drop what the last measurement left allocated, so the next one starts from a clean card."""
    import gc
    gc.collect()
    if _torch().cuda.is_available():
        _torch().cuda.empty_cache()


@contextlib.contextmanager
def cuda_numerics(tf32: bool = False, cudnn_benchmark: Optional[bool] = None):
    """Set the process-wide CUDA flags a measurement depends on, and restore them afterwards
    (the trainer sets cudnn.benchmark itself, so every baseline states its own). None leaves
    cudnn.benchmark as it is. EDM's defaults: TF32 off; cudnn.benchmark on for training."""
    backends = _torch().backends
    saved = (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark)
    backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = tf32
    if cudnn_benchmark is not None:
        backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark = saved


def measure(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
            device: str = "cpu", inner: int = 1) -> list[float]:
    """Seconds per call of `fn`, one entry per repeat.

    `inner` > 1 calls fn that many times per repeat and divides, for calls too short to
    time one by one (microseconds on CPU). Warm-up calls are untimed: they absorb
    torch.compile, cuDNN autotuning, allocator growth and lazy initialisation.
    """
    if repeats < 1 or warmup < 0 or inner < 1:
        raise ValueError(f"measure: need repeats >= 1, warmup >= 0, inner >= 1 "
                         f"(got {repeats}, {warmup}, {inner})")
    cuda = str(device).startswith("cuda")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if cuda:
        torch = _torch()
        torch.cuda.synchronize()
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0 / inner)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# --------------------------------------------------------------------------------------
# Result records
# --------------------------------------------------------------------------------------

_TIME_UNITS = {"ns", "us", "ms", "s", "min", "h"}
_SIZE_UNITS = {"B", "bytes", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"}


def higher_is_better_for(unit: str) -> Optional[bool]:
    """Orientation of a unit: True for rates, False for times and sizes, None if unknown."""
    if unit.endswith("/s"):
        return True                       # img/s, GB/s, TFLOP/s, steps/s
    head = unit.split("/", 1)[0].strip()  # "ms/step" -> "ms", "GB/step" -> "GB"
    if head in _TIME_UNITS or head in _SIZE_UNITS:
        return False
    return None


def result(name: str, unit: str, ours: Optional[float], baseline: Optional[float],
           baseline_name: str, ours_repeats: Optional[list[float]] = None,
           baseline_repeats: Optional[list[float]] = None, *,
           higher_is_better: Optional[bool] = None, **extra: Any) -> dict:
    """One benchmark figure, as it goes into the JSON and the table.

    `ours` and `baseline` are the reported values (medians) in `unit`; the repeats are the
    raw per-repeat values in the same unit. `ratio` is ours against the baseline with
    higher = better for us (see the module docstring); None when either side is missing
    or zero. Extra keyword arguments (batch size, FLOPs, notes) are stored as they are.
    """
    if higher_is_better is None:
        higher_is_better = higher_is_better_for(unit)
        if higher_is_better is None:
            raise ValueError(f"result({name!r}): cannot tell whether more {unit!r} is better; "
                             "pass higher_is_better=True or False")
    for key in ("name", "unit", "baseline_name", "ratio", "higher_is_better",
                "ours_repeats", "baseline_repeats"):
        if key in extra:
            raise ValueError(f"result({name!r}): extra key {key!r} clashes with a standard field")
    ratio = None
    if ours is not None and baseline is not None and ours != 0 and baseline != 0:
        ratio = ours / baseline if higher_is_better else baseline / ours
    return {
        "name": name,
        "unit": unit,
        "ours": None if ours is None else float(ours),
        "baseline": None if baseline is None else float(baseline),
        "baseline_name": baseline_name,
        "ratio": ratio,
        "higher_is_better": higher_is_better,
        "ours_repeats": [float(v) for v in (ours_repeats or [])],
        "baseline_repeats": [float(v) for v in (baseline_repeats or [])],
        **extra,
    }


def per_second(count: float, seconds: list[float]) -> list[float]:
    """Turn per-repeat times into per-repeat rates (e.g. images per second)."""
    return [count / s for s in seconds]


# --------------------------------------------------------------------------------------
# Reference ceilings measured in the run (used for MFU and bandwidth fractions)
# --------------------------------------------------------------------------------------

def matmul_flops_per_s(device: str, n: int, dtype: Any = None, repeats: int = 5) -> list[float]:
    """Measured FLOP/s of an n x n x n matrix product (2 n^3 FLOPs), one value per repeat.

    dtype defaults to bfloat16. Random operands, not zeros: the tensor cores run measurably
    faster on zeros.
    """
    torch = _torch()
    dtype = dtype or torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    seconds = measure(lambda: torch.mm(a, b), repeats=repeats, warmup=2, device=device)
    return per_second(2.0 * n ** 3, seconds)


# --------------------------------------------------------------------------------------
# Machine details
# --------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    """CPU/GPU model, library versions, git revision and date, for the JSON header."""
    from ambient_dist.provenance import provenance   # the one home of versions and revision
    prov = provenance()
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "device": device,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        **prov,
        "nvidia_dali": prov["nvidia-dali-cuda130"] or prov["nvidia-dali-cuda120"],
        # A copy of the tree without .git (the GPU machine's) is told its revision through
        # $GIT_REVISION; uncommitted changes make a revision irreproducible: provenance says so.
        "git_revision": prov["git_revision"] or os.environ.get("GIT_REVISION"),
    }
    if device == "cuda":
        torch = _torch()
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    gpu_multiprocessors=props.multi_processor_count,
                    cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def short_device_name(info: dict) -> str:
    """'cpu', or 'cuda-h200' style, for file names of dated results."""
    if info.get("device") != "cuda":
        return "cpu"
    gpu = str(info.get("gpu", "")).lower()
    for model in ("gb200", "b200", "h200", "h100", "a100", "a10", "l40s", "l4"):
        if model in gpu:
            return f"cuda-{model}"
    return "cuda"
