"""The benchmark suite's plumbing: harness records, run_all's isolation and report, and the
--quick path of benchmarks/run.sh end to end on one cheap real benchmark. Structure only:
no assertion here depends on how fast anything ran."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.harness import RESULT_KEYS, Context, cuda_numerics, measure, median, result  # noqa: E402
from benchmarks.run_all import check_results, markdown, prioritise, select  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --------------------------------------------------------------------------------------
# harness
# --------------------------------------------------------------------------------------

def test_ratio_orientation_is_higher_is_better():
    fast = result("x", "img/s", 200.0, 100.0, "plain")
    assert fast["ratio"] == pytest.approx(2.0) and fast["higher_is_better"] is True
    quick = result("x", "ms", 50.0, 100.0, "plain")           # half the time = 2x better
    assert quick["ratio"] == pytest.approx(2.0) and quick["higher_is_better"] is False
    per_step = result("x", "ms/step", 200.0, 100.0, "plain")  # twice the time = 0.5x
    assert per_step["ratio"] == pytest.approx(0.5)
    smaller = result("x", "GB/step", 1.0, 4.0, "plain")
    assert smaller["ratio"] == pytest.approx(4.0)


def test_result_has_schema_fields_and_keeps_extras():
    r = result("train/ddpmpp", "img/s", 3.0, 1.0, "fp32 eager", [2.9, 3.0], [1.0, 1.1],
               batch=8, note="tiny")
    assert set(RESULT_KEYS) <= set(r)
    assert r["ours_repeats"] == [2.9, 3.0] and r["baseline_repeats"] == [1.0, 1.1]
    assert r["batch"] == 8 and r["note"] == "tiny"
    json.dumps(r)   # plain JSON values only


def test_result_refuses_unknown_unit_and_missing_baseline_gives_no_ratio():
    with pytest.raises(ValueError, match="higher_is_better"):
        result("x", "widgets", 1.0, 2.0, "plain")
    assert result("x", "widgets", 1.0, 2.0, "plain", higher_is_better=True)["ratio"] == 0.5
    assert result("x", "img/s", 1.0, None, "none")["ratio"] is None
    with pytest.raises(ValueError, match="clashes"):
        result("x", "img/s", 1.0, 1.0, "b", ratio=3)


def test_cuda_numerics_sets_the_flags_and_restores_them_even_after_an_error():
    import torch
    b = torch.backends
    before = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark)
    with cuda_numerics(tf32=True, cudnn_benchmark=not before[2]):
        assert b.cuda.matmul.allow_tf32 and b.cudnn.allow_tf32
        assert b.cudnn.benchmark == (not before[2])
    with pytest.raises(RuntimeError):
        with cuda_numerics(tf32=False):
            assert b.cudnn.benchmark == before[2]  # None leaves it alone
            raise RuntimeError("a failed measurement")
    assert (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark) == before


def test_measure_returns_one_positive_time_per_repeat_after_warmup():
    calls = []
    times = measure(lambda: calls.append(1), repeats=4, warmup=2, inner=3)
    assert len(times) == 4 and all(t >= 0 for t in times)
    assert len(calls) == 2 + 4 * 3
    with pytest.raises(ValueError):
        measure(lambda: None, repeats=0)


def test_context_rejects_bad_options():
    with pytest.raises(ValueError, match="device"):
        Context(device="tpu")
    with pytest.raises(ValueError, match="exclude"):
        Context(quick=True, full=True)
    ctx = Context(quick=True)
    assert ctx.size(quick=1, default=2, full=3) == 1
    assert Context(full=True).size(quick=1, default=2, full=3) == 3
    assert Context().size(quick=1, default=2, full=3) == 2


def test_malformed_module_output_is_rejected_with_its_name():
    with pytest.raises(ValueError, match="bench_m.run: result 'x' lacks unit"):
        check_results("m", [{"name": "x"}])
    with pytest.raises(TypeError, match="expected a list"):
        check_results("m", {"name": "x"})
    good = [result("x", "s", 1.0, 1.0, "b")]
    assert check_results("m", good) is good


def test_select_accepts_short_and_module_names_and_rejects_unknown():
    mods = {"train": Path("bench_train.py"), "eval": Path("bench_eval.py")}
    assert list(select(mods, ["bench_train"])) == ["train"]
    assert list(select(mods, ["train,eval"])) == ["train", "eval"]
    assert list(select(mods, ["eval", "train", "eval"])) == ["eval", "train"]   # order kept
    with pytest.raises(SystemExit, match="no such benchmark"):
        select(mods, ["trian"])
    # --first reorders and tolerates names that do not exist (yet).
    mods = {"a": Path("a"), "b": Path("b"), "c": Path("c")}
    assert list(prioritise(mods, ["c,nosuch", "b"])) == ["c", "b", "a"]


# --------------------------------------------------------------------------------------
# run_all: a failing module is recorded, the rest survives, the table comes last
# --------------------------------------------------------------------------------------

def _run_suite(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "benchmarks" / "run.sh"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _table_rows(stdout: str) -> list[str]:
    """The Markdown table rows at the very end of the output."""
    lines = stdout.rstrip("\n").splitlines()
    rows = []
    for line in reversed(lines):
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows[::-1]


def test_failing_and_crashing_modules_are_recorded_and_the_rest_is_kept(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_good.py").write_text(textwrap.dedent("""
        from benchmarks.harness import result
        def run(ctx):
            return [result("good/thing", "img/s", 4.0, 2.0, "plain", [4.0], [2.0],
                           quick=ctx.quick)]
    """))
    (bench / "bench_raises.py").write_text("def run(ctx):\n    raise RuntimeError('boom')\n")
    (bench / "bench_dies.py").write_text("import os\ndef run(ctx):\n    os._exit(7)\n")
    out, results = tmp_path / "report.json", tmp_path / "results"
    proc = _run_suite(["--quick", "--bench-dir", str(bench), "--out", str(out),
                       "--results-dir", str(results)])
    assert proc.returncode == 1, proc.stderr          # some modules failed
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == ["good/thing"]
    assert report["results"][0]["quick"] is True and report["results"][0]["ratio"] == 2.0
    errors = {e["module"]: e["error"] for e in report["errors"]}
    assert set(errors) == {"raises", "dies"}
    assert "boom" in errors["raises"]
    assert "exit status 7" in errors["dies"]
    for key in ("date", "cpu", "torch", "git_revision", "device"):
        assert key in report["machine"]
    # The table is the last thing printed: the good row and one ERROR row per failure.
    rows = _table_rows(proc.stdout)
    assert rows[0].startswith("| benchmark |")
    assert any(r.startswith("| good/thing | img/s |") and "2.00x" in r for r in rows)
    assert sum("| ERROR |" in r for r in rows) == 2
    # Dated copies of the JSON and the table.
    dated = sorted(p.name for p in results.iterdir())
    assert len(dated) == 2 and dated[0].endswith("-cpu-quick.json") and dated[1].endswith(".md")


def test_in_process_mode_records_results_and_errors_too(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_good.py").write_text(
        "from benchmarks.harness import result\n"
        "def run(ctx):\n    return [result('good', 'ms', 1.0, 3.0, 'b')]\n")
    (bench / "bench_raises.py").write_text("def run(ctx):\n    raise KeyError('gone')\n")
    out = tmp_path / "r.json"
    proc = _run_suite(["--quick", "--in-process", "--bench-dir", str(bench), "--out", str(out),
                       "--results-dir", ""])
    assert proc.returncode == 1
    report = json.loads(out.read_text())
    assert [r["ratio"] for r in report["results"]] == [3.0]
    assert report["errors"][0]["module"] == "raises" and "gone" in report["errors"][0]["error"]


def test_only_filters_and_unknown_name_fails_clearly(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_a.py").write_text(
        "from benchmarks.harness import result\n"
        "def run(ctx):\n    return [result('a', 's', 1.0, 2.0, 'b')]\n")
    (bench / "bench_b.py").write_text("def run(ctx):\n    raise SystemError('must not run')\n")
    proc = _run_suite(["--quick", "--only", "a", "--bench-dir", str(bench),
                       "--results-dir", ""])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "must not run" not in proc.stdout + proc.stderr
    proc = _run_suite(["--only", "c", "--bench-dir", str(bench), "--results-dir", ""])
    assert proc.returncode != 0 and "no such benchmark" in proc.stderr


def test_timeout_keeps_partial_results_and_budget_skips_the_rest(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_a_slow.py").write_text(textwrap.dedent("""
        import time
        from benchmarks.harness import result
        def run(ctx):
            ctx.save_partial([result("slow/first", "s", 1.0, 2.0, "b")])
            time.sleep(600)
    """))
    (bench / "bench_b_never.py").write_text("def run(ctx):\n    return []\n")
    out = tmp_path / "report.json"
    proc = _run_suite(["--quick", "--bench-dir", str(bench), "--out", str(out),
                       "--results-dir", "", "--budget", "6"])
    assert proc.returncode == 1
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == ["slow/first"]     # kept
    errors = {e["module"]: e["error"] for e in report["errors"]}
    assert "timed out" in errors["a_slow"] and "skipped" in errors["b_never"]


def test_shell_entry_points_parse():
    for script in ("run.sh", "gpu_runbook.sh"):
        proc = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_markdown_shows_every_result_and_error():
    report = {"machine": {"date": "2026-01-01T00:00:00+00:00", "cpu": "X", "torch": "2",
                          "git_revision": "abc"},
              "options": {"device": "cpu", "quick": True, "full": False},
              "results": [result("r1", "img/s", 1234.5, 10.0, "base", note="n|x")],
              "errors": [{"module": "m", "error": "Boom: bad"}]}
    table = markdown(report)
    assert "| r1 | img/s | 1234 | 10 | base | 123.45x | n/x |" in table
    assert "| m | ERROR |" in table and "Boom: bad" in table


# --------------------------------------------------------------------------------------
# Baselines: plain, but the same mathematics as our path
# --------------------------------------------------------------------------------------

def _tiny_net():
    import torch
    from ambient_dist.config import load_config
    from ambient_dist.models import build_network
    cfg = load_config(None, ["data.resolution=8", "data.channels=1", "network.model_channels=8",
                             "network.channel_mult=[1]", "network.num_blocks=1",
                             "network.attn_resolutions=[]", "network.dropout=0"])
    torch.manual_seed(0)
    return build_network(cfg).eval().requires_grad_(False)


def test_plain_heun_sampler_matches_the_project_sampler_from_the_same_noise():
    import torch
    from ambient_dist.sampling import PerImageNoise, SamplerSettings, edm_sample
    from benchmarks.baselines import plain_heun_sample
    net = _tiny_net()
    indices, shape = [0, 1, 2], (1, 8, 8)
    ours = edm_sample(net, indices, shape, seed=3, settings=SamplerSettings(num_steps=6))
    noise = PerImageNoise(3, indices).randn(shape, "cpu")    # the noise edm_sample starts from
    plain = plain_heun_sample(net, noise, num_steps=6)
    assert plain.dtype == torch.float32 and plain.shape == ours.shape
    torch.testing.assert_close(plain, ours, rtol=1e-4, atol=1e-4)


def test_plain_training_step_updates_weights_and_ema():
    import torch
    from benchmarks.baselines import PlainTrainingStep
    net = _tiny_net().train().requires_grad_(True)
    before = [p.detach().clone() for p in net.parameters()]
    step = PlainTrainingStep(net, sigma_tn=0.5, lr=1e-2)
    clean = torch.rand(4, 1, 8, 8) * 2 - 1
    loss = step(clean, clean + 0.5 * torch.randn_like(clean))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))
    # The EMA moved towards the new weights, by (1 - beta) of the step.
    moved = [(e - b).abs().sum() for e, b in zip(step.ema.parameters(), before)]
    assert sum(moved) > 0
    with pytest.raises(ValueError, match="precision"):
        PlainTrainingStep(net, 0.5, precision="fp16")


# --------------------------------------------------------------------------------------
# The benchmarks' own code paths, in process, at the smallest sizes (catches interface drift
# in the trainer, loader and config that a GPU run would otherwise discover)
# --------------------------------------------------------------------------------------

def test_training_benchmark_variants_each_take_a_step(tmp_path):
    from benchmarks import bench_train as bt
    ctx = Context(quick=True)
    case = bt.CASES[0]
    shards = bt.make_shards(tmp_path, 4, case.resolution)
    cfg = bt.experiment(ctx, case, shards, tmp_path / "runs", batch=2, count=4)
    assert cfg.train.precision == "bf16" and cfg.train.channels_last and not cfg.train.compile
    assert len(bt.time_ours(cfg, ctx, tmp_path / "run", warmup=0, repeats=1)) == 1
    for precision in ("fp32", "bf16"):
        assert len(bt.time_plain(cfg, ctx, precision, False, warmup=0, repeats=1)) == 1
    assert bt.train_gflop(cfg) > 0


def test_training_rows_ratio_mfu_and_a_failed_baseline(tmp_path, monkeypatch):
    from benchmarks import bench_train as bt

    def fake_plain(cfg, ctx, precision, compile, warmup, repeats):
        if precision == "bf16":
            raise RuntimeError("no bf16 here")
        return [0.5, 0.5]
    monkeypatch.setattr(bt, "time_plain", fake_plain)
    monkeypatch.setattr(bt, "time_ours", lambda *a, **k: [0.25, 0.25])
    rows = bt.case_results(Context(quick=True), bt.CASES[0], ("fp32 matmul", 1.0), tmp_path)
    by_name = {r["name"].rsplit("/", 1)[1]: r for r in rows}
    fp32, bf16 = by_name["vs-fp32-eager"], by_name["vs-bf16-compile"]
    batch = fp32["batch"]
    assert fp32["ours"] == pytest.approx(batch / 0.25) and fp32["ratio"] == pytest.approx(2.0)
    # MFU = img/s x FLOPs per image / ceiling (1 TFLOP/s here).
    assert fp32["mfu_ours"] == pytest.approx(batch / 0.25 * fp32["gflop_per_img"] * 1e9 / 1e12)
    assert bf16["baseline"] is None and bf16["ratio"] is None
    assert "baseline failed: RuntimeError: no bf16 here" in bf16["note"]


def test_communication_volume_by_zero_stage():
    from benchmarks.bench_distributed import GRAD_BYTES, WEIGHT_BYTES, comm_bytes, ddpmpp_load
    P, N = 1000, 4
    share = P * (N - 1) / N
    assert sum(comm_bytes(P, N, 0).values()) == 2 * share * GRAD_BYTES
    for stage in (1, 2):
        assert comm_bytes(P, N, stage) == {"all_reduce": 0.0, "reduce_scatter": share * GRAD_BYTES,
                                           "all_gather": share * WEIGHT_BYTES}
    assert comm_bytes(P, N, 3)["all_gather"] == 2 * share * WEIGHT_BYTES
    with pytest.raises(ValueError, match="stage"):
        comm_bytes(P, N, 4)
    # EDM's CIFAR-10 DDPM++ has 55.7M parameters; counted from the shipped config.
    model = ddpmpp_load("c", "configs/cifar10-ddpmpp.yaml", 127.1, 3000.0)
    assert 55.0e6 < model.params < 56.5e6


# --------------------------------------------------------------------------------------
# The real suite, --quick, one cheap benchmark, end to end
# --------------------------------------------------------------------------------------

def test_quick_suite_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "quick.json"
    proc = _run_suite(["--quick", "--device", "cpu", "--only", "matmul", "--out", str(out),
                       "--results-dir", str(tmp_path / "results")])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["options"]["quick"] is True and report["errors"] == []
    assert report["modules"]["matmul"]["ok"] is True
    (row,) = report["results"]
    assert set(RESULT_KEYS) <= set(row)
    assert row["unit"] == "TFLOP/s" and row["ours"] > 0 and row["baseline"] > 0
    assert len(row["ours_repeats"]) == len(row["baseline_repeats"]) >= 1
    assert row["ratio"] == pytest.approx(row["ours"] / row["baseline"])
    rows = _table_rows(proc.stdout)
    assert len(rows) == 3 and rows[2].startswith(f"| {row['name']} |")


# --------------------------------------------------------------------------------------
# On a GPU machine (deselected elsewhere; their CPU twins are the tests above)
# --------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_measure_times_gpu_work_with_cuda_events():
    import torch
    x = torch.randn(2048, 2048, device="cuda")
    one = median(measure(lambda: x @ x, repeats=5, warmup=2, device="cuda"))
    four = median(measure(lambda: x @ x, repeats=5, warmup=2, device="cuda", inner=4))
    # Events time the GPU's work, not the launch: a product of 2048^3 takes microseconds
    # at least, and per-call time with inner=4 is the same order as one call.
    assert 1e-6 < one < 1.0 and 0.2 < four / one < 5


@pytest.mark.gpu
def test_quick_suite_end_to_end_on_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run_suite(["--quick", "--device", "cuda", "--only", "matmul,train", "--out", str(out),
                       "--results-dir", ""])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["gpu"] and report["errors"] == []
    names = {r["name"] for r in report["results"]}
    assert {"train/ddpmpp32/vs-fp32-eager", "train/ddpmpp64/vs-fp32-eager"} <= names
