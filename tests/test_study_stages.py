"""When a study stage is reused, redone or refused (ambient_dist/study/stages.py): every input
each stage's digest covers, changed one at a time on a copy of one trained toy study (issue
20, cases 1, 2 and 4's printing); the report built only from current results."""
import json
import shutil

import pytest

from ambient_dist.study import StudyFailed, load_study, run_study
from ambient_dist.study import stages as S
from helpers import TOY_STUDY, load_launcher, write_standin_inception, write_study

pytestmark = pytest.mark.usefixtures("one_thread")

# One run, pixel-space memorization only; a small CNN stands in for Inception (the real one
# is in tests/test_study.py's end-to-end test): each redone evaluation stays fast.
BASE = {**TOY_STUDY, "runs": [{"name": "ddpm", "sigma_tn": 0.0}],
        "evaluation": {**TOY_STUDY["evaluation"], "features": []}}
ONE: dict = {}   # BASE with the stand-in's path (set by the `trained` fixture)
RUN = "ddpm-n12-s0"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One toy run through every stage (trained once for the whole file)."""
    root = tmp_path_factory.mktemp("trained")
    standin = write_standin_inception(root / "standin.pt")
    ONE.update({**BASE, "overrides": BASE["overrides"] + [f"evaluation.inception_path={standin}"]})
    outcome = run_study(write_study(root, ONE), out=str(root / "out"), device="cpu", progress=False)
    assert outcome.report.is_file() and not outcome.failures
    return root / "out"


def copy_of(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out


# Study files as changes of ONE (functions: ONE is known once the fixture ran).
def with_evaluation(**changes):
    return lambda: {**ONE, "evaluation": {**ONE["evaluation"], **changes}}


def with_overrides(*extra: str):
    return lambda: {**ONE, "overrides": ONE["overrides"] + list(extra)}


def with_data(**changes):
    return lambda: {**ONE, "data": {**ONE["data"], **changes}}


def rerun(trained, tmp_path, study: dict):
    """run_one on a copy of the trained study under `study`; (stages, study, spec)."""
    out = copy_of(trained, tmp_path)
    cfg, specs = load_study(write_study(tmp_path, study), out=str(out))
    return S.run_one(cfg, specs[0], "cpu", False), cfg, specs[0]


def test_an_unchanged_study_reuses_every_stage(trained, tmp_path):
    result, study, spec = rerun(trained, tmp_path, ONE)
    assert result["stages"] == {"shards": "reused", "train": "reused", "sample": "reused",
                                "evaluate": "reused"}
    assert S.result_status(study, spec) == (result["evaluation"], None)


# Inputs of the evaluation only: the samples and the training are reused, the evaluation redone.
EVALUATION_CHANGES = {
    "quality_reference": with_evaluation(quality_reference=16),
    "attraction_sigmas": with_evaluation(attraction_sigmas=[2.0, 3.0]),
    "attraction_images": with_evaluation(attraction_images=4),
    "calibration_images": with_evaluation(calibration_images=10),
    "features": with_evaluation(features=["inception"]),
    "figure_sigma": with_evaluation(figure_sigma=1.0),
    "figure_rows": with_evaluation(figure_rows=1),
    "batch": with_evaluation(batch=16),
    "run evaluation.thresholds": with_overrides("evaluation.thresholds=[0.8]"),
}
# Inputs of the samples: samples and evaluation redone, training reused.
SAMPLE_CHANGES = {
    "num_samples": with_evaluation(num_samples=6),
    "sampling.steps": with_overrides("sampling.steps=4"),
    "sampling.seed": with_overrides("sampling.seed=5"),
}


@pytest.mark.parametrize("what", sorted(EVALUATION_CHANGES) + sorted(SAMPLE_CHANGES))
def test_a_changed_input_redoes_its_stage_and_everything_after_it(trained, tmp_path, what):
    study_file = (EVALUATION_CHANGES.get(what) or SAMPLE_CHANGES[what])()
    before = json.loads((trained / "runs" / RUN / "study-eval.json").read_text())
    result, study, spec = rerun(trained, tmp_path, study_file)
    assert result["stages"] == {"shards": "reused", "train": "reused",
                                "sample": "made" if what in SAMPLE_CHANGES else "reused",
                                "evaluate": "made"}
    after = result["evaluation"]
    assert after["digest"] != before["digest"]
    assert S.result_status(study, spec)[0] == after
    ev = study.evaluation
    assert after["quality"]["kid"]["num_reference"] == ev.quality_reference
    assert after["num_samples"] == ev.num_samples
    assert list(after["attraction"]["per_sigma"]) == [f"{s:g}" for s in ev.attraction_sigmas]
    assert after["attraction"]["count"] == ev.attraction_images
    assert list(after["memorization"]) == ["pixels"] + ev.features
    assert after["memorization"]["pixels"]["heldout"]["count"] == ev.calibration_images
    # the run directory's config.yaml says what the samples were made with
    from ambient_dist.config import load_config
    cfg = load_config(spec.run_dir / "config.yaml")
    assert (cfg.sampling.steps, cfg.sampling.seed) == (spec.config.sampling.steps,
                                                       spec.config.sampling.seed)


def test_options_that_do_not_change_the_weights_reuse_the_training(trained, tmp_path):
    result, _, spec = rerun(trained, tmp_path, with_overrides("train.log_every_kimg=0.096",
                                                              "train.keep_checkpoints=3")())
    assert result["stages"]["train"] == "reused" and result["stages"]["sample"] == "reused"
    from ambient_dist.config import load_config
    assert load_config(spec.run_dir / "config.yaml").train.keep_checkpoints == 3


# Inputs of the training that its checkpoints cannot continue under: refused, naming them.
TRAINING_REFUSALS = {
    "optimizer.lr": (with_overrides("optimizer.lr=0.002"), r"optimizer\.lr: 0\.001 -> 0\.002"),
    "network": (with_overrides("network.model_channels=16"), r"network\.model_channels: 8 -> 16"),
    "shorter schedule": (with_overrides("train.total_kimg=0.064"),
                         r"train\.total_kimg: 0\.096 -> 0\.064 \(it trained 0\.096k images already\)"),
    "data.heldout": (with_data(heldout=28),
                     r"data plan\.heldout: 24 -> 28"),
    "data.resolution": (with_overrides("data.resolution=16"), r"data plan\.resolution: 8 -> 16"),
    "data.subset_seed": (with_data(subset_seed=3),
                         r"data plan\.subset_seed: 0 -> 3"),
}


@pytest.mark.parametrize("what", sorted(TRAINING_REFUSALS))
def test_a_change_that_invalidates_the_checkpoints_is_refused_naming_it(trained, tmp_path, what):
    study_file, changed = TRAINING_REFUSALS[what]
    out = copy_of(trained, tmp_path)
    path = write_study(tmp_path, study_file())
    _, specs = load_study(path, out=str(out))
    message = S.training_refusal(specs[0])
    assert message is not None
    import re
    assert re.search(changed, message), message
    assert "--retrain ddpm-n12-s0" in message and "--retrain ddpm " in message
    # run_study refuses before anything starts: no shards made, nothing trained
    shards_before = sorted(p.name for p in (out / "shards").iterdir())
    log = (out / "runs" / RUN / "train.log").read_text()
    cli = load_launcher("study")
    assert cli.main([str(path), "--out", str(out), "--check"]) == 2
    assert cli.main([str(path), "--out", str(out), "--quiet"]) == 2
    assert sorted(p.name for p in (out / "shards").iterdir()) == shards_before
    assert (out / "runs" / RUN / "train.log").read_text() == log
    # the worker's entry point refuses too, as a failed train stage
    study, specs = load_study(path, out=str(out))
    with pytest.raises(S.RunFailed, match="trained under other settings") as e:
        S.run_one(study, specs[0], "cpu", False)
    assert e.value.stage == "train"
    assert json.loads((out / "runs" / RUN / "study-failed.json").read_text())["stage"] == "train"


def test_retrain_trains_from_scratch_under_the_new_settings(trained, tmp_path, capsys):
    out = copy_of(trained, tmp_path)
    path = write_study(tmp_path, with_overrides("optimizer.lr=0.002")())
    cli = load_launcher("study")
    assert cli.main([str(path), "--out", str(out), "--retrain", "nosuchrun"]) == 2
    assert "--retrain nosuchrun: no such run" in capsys.readouterr().err
    assert cli.main([str(path), "--out", str(out), "--retrain", "ddpm"]) == 0
    log = (out / "runs" / RUN / "train.log").read_text()
    assert "resuming from" not in log
    record = json.loads((out / "runs" / RUN / "study-train.json").read_text())
    assert record["status"] == "done" and record["inputs"]["options"]["optimizer.lr"] == 0.002
    report = json.loads((out / "report.json").read_text())
    assert [r["run"] for r in report["rows"]] == ["ddpm"] and not report["not_in_table"]


def test_case1_new_evaluation_settings_are_not_answered_with_stale_results(trained, tmp_path):
    """Case 1: quality_reference and attraction_sigmas edited, same directory: the evaluation
    is redone, and the report's headings and columns are those of the numbers under them."""
    out = copy_of(trained, tmp_path)
    path = write_study(tmp_path, with_evaluation(quality_reference=8, attraction_sigmas=[2.0, 3.0])())
    assert load_launcher("study").main([str(path), "--out", str(out), "--quiet"]) == 0
    ev = json.loads((out / "runs" / RUN / "study-eval.json").read_text())
    assert ev["quality"]["kid"]["num_reference"] == 8
    assert set(ev["attraction"]["per_sigma"]) == {"2", "3"}
    report = json.loads((out / "report.json").read_text())
    assert set(report["rows"][0]["attraction"]) == {"2", "3"}
    md = (out / "report.md").read_text()
    assert "against 8 held-out real images" in md
    assert "σ=2" in md and "σ=3" in md and "σ=1)" not in md


def test_case2_a_study_with_stale_and_missing_results_is_still_reported(trained, tmp_path):
    """Case 2: two runs, the second's evaluation missing, attraction_sigmas edited: the
    report (also --report-only) names both runs instead of raising KeyError; a full rerun
    then brings both back under the new settings."""
    out = copy_of(trained, tmp_path)
    # a second run with the same training settings: its directory is a copy of the first's
    shutil.copytree(out / "runs" / RUN, out / "runs" / "twin-n12-s0")
    (out / "runs" / "twin-n12-s0" / "study-eval.json").unlink()
    two = {**with_evaluation(attraction_sigmas=[2.0, 3.0])(),
           "runs": [{"name": "ddpm"}, {"name": "twin"}]}
    path = write_study(tmp_path, two)
    cli = load_launcher("study")
    assert cli.main([str(path), "--out", str(out), "--report-only", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == []
    assert "evaluated under other settings" in report["not_in_table"][RUN]
    assert "study_evaluation.attraction_sigmas: [1.0, 2.0] -> [2.0, 3.0]" in report["not_in_table"][RUN]
    assert report["not_in_table"]["twin-n12-s0"] == "not evaluated yet"
    md = (out / "report.md").read_text()
    assert "## Not in the table" in md and "twin-n12-s0: not evaluated yet" in md
    assert cli.main([str(path), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["run"] for r in report["rows"]] == ["ddpm", "twin"] and not report["not_in_table"]
    assert all(set(r["attraction"]) == {"2", "3"} for r in report["rows"])


def test_a_damaged_result_file_is_named_not_raised(trained, tmp_path):
    out = copy_of(trained, tmp_path)
    (out / "runs" / RUN / "study-eval.json").write_text("{not json")
    path = write_study(tmp_path, ONE)
    assert load_launcher("study").main([str(path), "--out", str(out), "--report-only"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == [] and "is unreadable" in report["not_in_table"][RUN]


def test_failed_runs_make_the_study_fail_and_are_not_trained(tmp_path, monkeypatch, capsys):
    """Case 4's run time: every run fails at its shards; nothing prints 'training', the
    report names them, and the study fails (exit 1) naming each."""
    def broken(study, spec, progress):
        raise OSError(f"disk full writing {spec.shards}")
    monkeypatch.setattr(S, "make_run_shards", broken)
    from ambient_dist.study import runner
    monkeypatch.setattr(runner, "make_run_shards", broken)
    path = write_study(tmp_path, TOY_STUDY)
    with pytest.raises(StudyFailed) as e:
        run_study(path, out=str(tmp_path / "out"), device="cpu")
    assert set(e.value.failures) == {"ddpm-n12-s0", "ambient-0.5-n12-s0"}
    assert all(v.startswith("shards: OSError: disk full") for v in e.value.failures.values())
    assert "2 runs failed: ddpm-n12-s0 (shards: OSError" in str(e.value)
    printed = capsys.readouterr().out
    assert "shards FAILED" in printed and "training" not in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["failures"]) == set(e.value.failures)
    assert "## Failed runs" in (tmp_path / "out" / "report.md").read_text()
    assert load_launcher("study").main([str(path), "--out", str(tmp_path / "out")]) == 1
    assert "error: 2 runs failed" in capsys.readouterr().err


def test_the_study_row_is_what_ambient_evaluate_reports_for_the_run(trained, tmp_path):
    """One evaluation path (metrics.assess): ambient-evaluate on a study's run, with the
    study's settings, gives the study's numbers exactly (KID, FID, pixel-space memorization
    with its calibration, denoiser attraction)."""
    out = copy_of(trained, tmp_path)
    run = out / "runs" / RUN
    ours = json.loads((run / "study-eval.json").read_text())
    row = json.loads((out / "report.json").read_text())["rows"][0]
    ev = ONE["evaluation"]
    argv = [str(run), "--features", "pixels", "--quality-reference", str(ev["quality_reference"]),
            "--attraction-sigmas", *map(str, ev["attraction_sigmas"]),
            "--attraction-images", str(ev["attraction_images"]), "--batch", str(ev["batch"]),
            "--no-fid", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "eval"),
            "--device", "cpu", "--quiet"]
    # In a process of its own, as the study's worker evaluated the run: float sums depend on
    # the thread count, which an earlier test of this session may have changed in this one.
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "ambient_dist.cli.evaluate", *argv],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    theirs = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert theirs["num_samples"] == ours["num_samples"] == ev["num_samples"]
    assert theirs["quality"]["kid"] == ours["quality"]["kid"]
    assert theirs["quality"]["fid"] == ours["quality"]["fid"]
    assert theirs["quality"]["reference"] == ours["quality"]["reference"]
    assert row["kid"]["values"] == [theirs["quality"]["kid"]["value"]]
    assert row["fid"]["values"] == [theirs["quality"]["fid"]]
    mem, study_mem = theirs["memorization"], ours["memorization"]["pixels"]
    for part in ("generated", "heldout"):
        for key in ("carlini_fraction", "fraction_above", "max_similarity", "count"):
            assert mem[part][key] == study_mem[part][key], (part, key)
    assert row["memorization"]["pixels"]["carlini"]["values"] == [mem["generated"]["carlini_fraction"]]
    assert theirs["attraction"]["per_sigma"] == ours["attraction"]["per_sigma"]
    assert theirs["attraction"]["count"] == ev["attraction_images"]


def test_ambient_evaluate_without_the_new_options_reports_as_before(trained, tmp_path):
    """The default ambient-evaluate output is unchanged: no quality or attraction unless asked."""
    out = copy_of(trained, tmp_path)
    argv = [str(out / "runs" / RUN), "--features", "pixels", "--no-fid", "--out",
            str(tmp_path / "eval"), "--device", "cpu", "--quiet"]
    assert load_launcher("evaluate").main(argv) == 0
    theirs = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert theirs["quality"] is None and theirs["attraction"] is None
    ours = json.loads((out / "runs" / RUN / "study-eval.json").read_text())
    assert theirs["memorization"]["generated"]["carlini_fraction"] == \
        ours["memorization"]["pixels"]["generated"]["carlini_fraction"]


@pytest.mark.parametrize("argv, message", [
    (["--quality-reference", "1"], "--quality-reference: 0 \\(none\\) or at least 2"),
    (["--attraction-images", "0", "--attraction-sigmas", "1"], "--attraction-images: must be >= 1"),
    (["--quality-reference", "500"], "--quality-reference 500: the shards .* hold only 24 held-out"),
])
def test_ambient_evaluate_refuses_bad_quality_and_attraction_options(trained, tmp_path, capsys,
                                                                     argv, message):
    out = copy_of(trained, tmp_path)
    base = [str(out / "runs" / RUN), "--features", "pixels", "--no-fid", "--out",
            str(tmp_path / "eval"), "--device", "cpu", "--quiet"]
    assert load_launcher("evaluate").main(base + argv) == 2
    import re
    assert re.search(message, capsys.readouterr().err)
