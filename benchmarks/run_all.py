"""Run the benchmark suite: every benchmarks/bench_*.py, one table, one JSON.

    python benchmarks/run_all.py [--quick|--full] [--device cpu|cuda] [--only NAMES]
                                 [--first NAMES] [--out FILE] [--results-dir DIR]
                                 [--timeout S] [--budget S] [--threads N] [--in-process]

(benchmarks/run.sh is the same with the project's virtual environment picked for you.)

Each module `bench_<name>.py` exposes `run(ctx) -> list[dict]` (dicts made by
`harness.result`). Each runs in its own child process, so that a module that raises, crashes
the interpreter, corrupts the CUDA context or hangs past --timeout costs only its own
figures: the error is recorded in the JSON and the table and the rest of the suite goes on.
The child writes its results to a temporary JSON file that this process reads back.

--timeout caps one module, --budget the whole suite (a module gets at most what is left;
modules not started in time are recorded as skipped). A module may hand over results as it
goes (ctx.save_partial); if it is then killed or crashes, those are kept beside the error.

Output: the Markdown table is printed LAST (so it is what a terminal or CI log ends with);
the JSON (machine details, options, results, errors) goes to --out if given, and a dated copy
of JSON and table to <results-dir>/<YYYY-MM-DD>-<device>[-quick|-full].json/.md (device:
cpu, or cuda-<card> such as cuda-h200).
Exit status 1 if any module failed, after everything is written.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    # Run as a script: make `benchmarks.*` and `ambient_dist` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import REPO_ROOT, RESULT_KEYS, Context, machine_info, short_device_name

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"


# --------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------

def discover(bench_dir: Path) -> dict[str, Path]:
    """{'train': .../bench_train.py, ...} for every bench_*.py, sorted by name."""
    return {p.stem[len("bench_"):]: p for p in sorted(bench_dir.glob("bench_*.py"))}


def _names(items: list[str]) -> list[str]:
    """['train,eval', 'bench_x'] -> ['train', 'eval', 'x']."""
    return [w.strip().removeprefix("bench_").removesuffix(".py")
            for item in items for w in item.split(",") if w.strip()]


def prioritise(modules: dict[str, Path], first: list[str]) -> dict[str, Path]:
    """The modules named in --first (those that exist) first, in that order, then the rest."""
    head = [n for n in dict.fromkeys(_names(first)) if n in modules]
    return {n: modules[n] for n in head + [n for n in modules if n not in head]}


def select(modules: dict[str, Path], only: list[str]) -> dict[str, Path]:
    """Filter by --only names ('train' or 'bench_train'; comma lists allowed), run in the
    order given; a name that does not exist is an error (a typo must not pass silently)."""
    if not only:
        return modules
    wanted = _names(only)
    unknown = [w for w in wanted if w not in modules]
    if unknown:
        raise SystemExit(f"run_all: --only {', '.join(unknown)}: no such benchmark "
                         f"(available: {', '.join(modules) or 'none'})")
    return {name: modules[name] for name in dict.fromkeys(wanted)}


# --------------------------------------------------------------------------------------
# One module, in the child process
# --------------------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    """Numbers from numpy/torch and Paths, as plain JSON values; NaN/inf as null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):   # numpy / torch scalars
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def check_results(module: str, results: Any) -> list[dict]:
    """The module's return value, or a TypeError/ValueError saying what is wrong with it."""
    if not isinstance(results, list):
        raise TypeError(f"bench_{module}.run returned {type(results).__name__}, expected a list "
                        "of dicts from harness.result")
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise TypeError(f"bench_{module}.run: item {i} is {type(r).__name__}, not a dict")
        missing = [k for k in RESULT_KEYS if k not in r]
        if missing:
            raise ValueError(f"bench_{module}.run: result {r.get('name', i)!r} lacks "
                             f"{', '.join(missing)} (build it with harness.result)")
    return results


def _write_text(path: Path, text: str) -> None:
    """Atomically: a reader never sees half a report, and a crash keeps the old one."""
    from ambient_dist.fileio import atomic_write_text  # the repository root is on sys.path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _write_json(path: Path, payload: Any) -> None:
    _write_text(path, json.dumps(_jsonable(payload), indent=2) + "\n")


def run_module(name: str, path: Path, ctx: Context) -> dict:
    """Import and run one module here: {'results': [...]}, or {'error': ..., 'traceback': ...}
    (with the results it saved through ctx.save_partial, if any)."""
    try:
        spec = importlib.util.spec_from_file_location(f"benchmarks.bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        if not callable(getattr(module, "run", None)):
            raise AttributeError(f"{path.name} has no run(ctx) function")
        return {"results": check_results(name, module.run(ctx))}
    except Exception as e:  # noqa: BLE001 - recorded, the suite goes on
        outcome = _read_partial(ctx.partial_path)
        return {**outcome, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def _read_partial(path: Optional[Path]) -> dict:
    """{'results': [...]} saved by ctx.save_partial before a failure, else {}."""
    if path is None or not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {"results": saved["results"]} if isinstance(saved.get("results"), list) else {}


def default_threads(args: argparse.Namespace) -> int:
    """Torch threads per module: 1 for --quick on CPU, else torch's own choice (0).

    Quick sizes gain nothing from a second thread, and on a busy CI machine spinning OpenMP
    threads make a tiny step many times slower, which would hide the ratios in noise."""
    if args.threads >= 0:
        return args.threads
    return 1 if args.quick and args.device == "cpu" else 0


def _worker_main(args: argparse.Namespace) -> int:
    ctx = Context(device=args.device, quick=args.quick, full=args.full,
                  out=Path(args.out) if args.out else None,
                  partial_path=Path(args.worker_out).with_name("partial.json"))
    name = Path(args.worker).stem.removeprefix("bench_")
    outcome = run_module(name, Path(args.worker), ctx)
    _write_json(Path(args.worker_out), outcome)
    return 0


# --------------------------------------------------------------------------------------
# One module, seen from the parent
# --------------------------------------------------------------------------------------

def run_isolated(name: str, path: Path, args: argparse.Namespace, timeout: Optional[float]) -> dict:
    """Run one module in a child process; its outcome, or an error naming what went wrong
    (plus whatever results it saved with ctx.save_partial before it died)."""
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as tmp:
        outcome_path = Path(tmp) / "outcome.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path),
               "--worker-out", str(outcome_path), "--device", args.device]
        cmd += ["--quick"] if args.quick else ["--full"] if args.full else []
        cmd += ["--out", args.out] if args.out else []
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        if args.threads > 0:
            # Read by torch when it is imported (no import here just to set it).
            env["OMP_NUM_THREADS"] = str(args.threads)
        # A session of its own, so that a timeout can end the module's whole process group
        # (benchmarks that start ranks or loader workers) and nothing else.
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {**_read_partial(outcome_path.with_name("partial.json")),
                    "error": f"timed out after {timeout:.0f} s (--timeout / --budget)"}
        if outcome_path.is_file():
            return json.loads(outcome_path.read_text())
        how = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
        return {**_read_partial(outcome_path.with_name("partial.json")),
                "error": f"child process ended with {how} before writing results"}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    mag = abs(value)
    if mag >= 1e4:
        return f"{value:,.0f}"
    if mag >= 100:
        return f"{value:.0f}"
    if mag >= 0.01:
        return f"{value:.3g}"
    return f"{value:.2e}"


def markdown(report: dict) -> str:
    m, o = report["machine"], report["options"]
    hw = m.get("gpu") or m.get("cpu")
    mode = "quick" if o["quick"] else "full" if o["full"] else "default"
    rev = (m.get("git_revision") or "unknown")[:10] + (" (dirty)" if m.get("git_dirty") else "")
    lines = [f"### Benchmarks: {o['device']} ({hw}), {mode} sizes, {m['date']}, git {rev}",
             f"torch {m['torch']}, triton {m.get('triton')}, deepspeed {m.get('deepspeed')}; "
             "ratio = ours vs baseline, higher is better for us", "",
             "| benchmark | unit | ours | baseline | baseline is | ratio | note |",
             "|---|---|---:|---:|---|---:|---|"]
    for r in report["results"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        note = str(r.get("note", "")).replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['name']} | {r['unit']} | {_fmt(r['ours'])} | {_fmt(r['baseline'])} "
                     f"| {r['baseline_name']} | {ratio} | {note} |")
    for e in report["errors"]:
        msg = e["error"].replace("|", "/").replace("\n", " ")[:300]
        lines.append(f"| {e['module']} | ERROR | - | - | - | - | {msg} |")
    return "\n".join(lines) + "\n"


def dated_name(report: dict) -> str:
    day = report["machine"]["date"][:10]
    suffix = "-quick" if report["options"]["quick"] else "-full" if report["options"]["full"] else ""
    return f"{day}-{short_device_name(report['machine'])}{suffix}"


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the ambient_dist benchmark suite.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes (CI; < 5 min on CPU)")
    size.add_argument("--full", action="store_true", help="paper-scale sizes (GPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this benchmark (e.g. train or bench_train; repeat or comma-list)")
    p.add_argument("--first", action="append", default=[], metavar="NAMES",
                   help="run these first, in this order, then the rest (names that do not "
                        "exist are ignored; for time-boxed runs)")
    p.add_argument("--out", default="", help="write the JSON report here too")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR),
                   help="where the dated JSON + Markdown copies go ('' = none)")
    p.add_argument("--bench-dir", default=str(BENCH_DIR), help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds one module may run before it is killed (0 = no limit)")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds for the whole suite (0 = no limit): a module gets at most what "
                        "is left, and modules not started in time are recorded as skipped")
    p.add_argument("--threads", type=int, default=-1,
                   help="torch threads per module (default: 1 for --quick on CPU, else torch's)")
    p.add_argument("--in-process", action="store_true",
                   help="run modules in this process (for debugging; no crash isolation)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    args.threads = default_threads(args)
    if args.worker:
        return _worker_main(args)

    # Fail on a bad --device before spending minutes on modules.
    try:
        ctx = Context(device=args.device, quick=args.quick, full=args.full,
                      out=Path(args.out) if args.out else None)
    except ValueError as e:
        raise SystemExit(f"run_all: --device {args.device}: {e}") from None
    modules = prioritise(select(discover(Path(args.bench_dir)), args.only), args.first)
    report: dict[str, Any] = {
        "machine": machine_info(args.device),
        "options": {"device": args.device, "quick": args.quick, "full": args.full,
                    "only": args.only, "timeout_s": args.timeout, "budget_s": args.budget,
                    "threads": args.threads or "torch default"},
        "results": [], "errors": [], "modules": {},
    }
    if args.in_process and args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    for name, path in modules.items():
        t0 = time.perf_counter()
        timeout = args.timeout or None
        if args.budget:
            left = args.budget - (t0 - start)
            if left < 1:
                outcome = {"error": f"skipped: the suite's --budget of {args.budget:g} s was spent"}
                report["errors"].append({"module": name, **outcome})
                report["modules"][name] = {"seconds": 0.0, "ok": False}
                continue
            timeout = min(timeout or left, left)
        print(f"== bench_{name} ==", flush=True)
        if args.in_process:
            outcome = run_module(name, path, ctx)
        else:
            outcome = run_isolated(name, path, args, timeout)
        seconds = time.perf_counter() - t0
        report["results"] += [{**r, "module": name} for r in outcome.get("results", [])]
        if "error" in outcome:
            report["errors"].append({"module": name, "error": outcome["error"],
                                     "traceback": outcome.get("traceback", "")})
            print(f"bench_{name} FAILED after {seconds:.1f} s: {outcome['error']}", flush=True)
            if outcome.get("traceback"):
                print(outcome["traceback"], file=sys.stderr, flush=True)
        report["modules"][name] = {"seconds": round(seconds, 2), "ok": "error" not in outcome}

    table = markdown(report)
    if args.out:
        _write_json(Path(args.out), report)
    if args.results_dir:
        base = Path(args.results_dir) / dated_name(report)
        _write_json(base.with_suffix(".json"), report)
        _write_text(base.with_suffix(".md"), table)
    print()
    print(table, end="", flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
