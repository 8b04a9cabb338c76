"""The study command: validation before anything starts, the whole pipeline at toy size, a
rerun that skips what was done, a failed run that does not stop the others, the report."""
import json
from pathlib import Path

import pytest

from ambient_dist.study import StudyError, load_study
from helpers import TOY_STUDY, load_launcher, write_study

ROOT = Path(__file__).resolve().parent.parent
TOY = TOY_STUDY


def write(tmp_path, study, name="study.yaml") -> Path:
    return write_study(tmp_path, study, name)


@pytest.mark.parametrize("change, message", [
    ({"runs": [{"name": "a", "sigma": 0.5}]}, r"runs\[0\]\.sigma: unknown key \(did you mean 'sigma_tn'\?\)"),
    ({"evaluaton": {}}, "evaluaton: unknown key"),
    ({"runs": [{"name": "n", "method": "noise_only", "sigma_tn": 0.0}]}, r"runs\[n\] of the study file \(overrides on fashion-mnist-300.yaml\): objective.sigma_tn: must be > 0"),
    ({"runs": [{"name": "x", "overrides": ["train.batchh=3"]}]}, "train.batchh: unknown key"),
    ({"data": {"source": "/no/such/dataset"}}, "data.source: '/no/such/dataset'"),
    ({"base": "/no/such.yaml"}, "base: config file /no/such.yaml not found"),
    ({"runs": [{"name": "a"}, {"name": "a"}]}, "run names must be unique"),
    ({"seeds": [0, 0]}, "seeds: must be a non-empty list of distinct seeds"),
    ({"evaluation": {**TOY["evaluation"], "figure_sigma": 3.0}}, "evaluation.figure_sigma"),
    ({"evaluation": {**TOY["evaluation"], "quality_reference": 500}}, "evaluation.quality_reference"),
    ({"runs": [{"name": "n", "method": "noise_only", "sigma_tn": 1.5}]}, "evaluation.attraction_sigmas"),
])
def test_bad_study_files_are_refused_before_anything_starts(tmp_path, change, message):
    path = write(tmp_path, {**TOY, **change})
    with pytest.raises((StudyError, ValueError), match=message):
        load_study(path, out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    study = load_launcher("study")
    assert study.main([str(path), "--out", str(tmp_path / "out")]) == 2


@pytest.mark.parametrize("device, message", [
    ("tpu", "--device tpu: expected auto, cpu, cuda or cuda:N"),
    ("gpu0", "--device gpu0: expected auto, cpu, cuda or cuda:N"),
    ("cuda", "--device cuda: no CUDA device on this machine"),
    ("cuda:1", "--device cuda:1: no CUDA device on this machine"),
])
def test_a_device_that_cannot_sample_is_refused_before_training(tmp_path, capsys, device, message):
    """Field case: --device tpu (or cuda on a CPU machine) trained every run to its end and
    failed at sampling. Refused before anything starts, by --check too."""
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        message = None  # on a GPU machine cuda is right: then it must pass the check
    path = write(tmp_path, TOY)
    study = load_launcher("study")
    rc = study.main([str(path), "--out", str(tmp_path / "out"), "--device", device, "--check"])
    if message is None:
        assert rc == 0
        return
    assert rc == 2 and capsys.readouterr().err.startswith(f"error: {message}")
    assert study.main([str(path), "--out", str(tmp_path / "out"), "--device", device]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_files_validate(path):
    """Every run of every shipped study builds a valid experiment config (the paper-scale
    datasets are not on this machine: their sources are not opened)."""
    study, specs = load_study(path, out="/tmp/unused", check_source="fashion-mnist" in path.name)
    assert len(specs) == sum(len(r.seeds or study.seeds) for r in study.runs) * len(study.subset_sizes)
    methods = {s.run.method for s in specs}
    assert methods == {"ambient", "noise_only", "masking"}
    assert any(s.run.sigma_tn == 0 and s.run.method == "ambient" for s in specs)   # the DDPM baseline


def test_study_runs_end_to_end_resumes_and_survives_a_failed_run(tmp_path, capsys):
    path = write(tmp_path, TOY)
    out = tmp_path / "out"
    study = load_launcher("study")
    assert study.main([str(path), "--out", str(out), "--device", "cpu"]) == 0
    runs = {name: out / "runs" / f"{name}-n12-s0" for name in ("ddpm", "ambient-0.5")}
    for run in runs.values():
        for f in ("ema.safetensors", "study-train.json", "study-eval.json", "study-attraction.pt"):
            assert (run / f).is_file(), f
    report = json.loads((out / "report.json").read_text())
    assert report["quality_conclusions_rest_on"] == "KID"
    by_run = {r["run"]: r for r in report["rows"]}
    for name, run in runs.items():
        ev = json.loads((run / "study-eval.json").read_text())
        row = by_run[name]
        assert row["kid"]["values"] == [ev["quality"]["kid"]["value"]]
        assert row["memorization"]["pixels"]["carlini"]["mean"] == ev["memorization"]["pixels"]["generated"]["carlini_fraction"]
        assert row["memorization"]["inception"]["above"]["values"][0] is not None
        assert set(row["attraction"]) == {"1", "2"}
        assert ev["num_samples"] == 8 and ev["quality"]["kid"]["num_reference"] == 20
    md = (out / "report.md").read_text()
    assert f"{1e3 * by_run['ddpm']['kid']['mean']:.3f}" in md
    assert "held-out real images (calibration)" in md and "## Against plain DDPM" in md
    for fig in report["figures"].values():
        assert (out / fig).is_file() and (out / fig).stat().st_size > 1000, fig
    assert any("Figure 3" in k for k in report["figures"]) and any("Figure 1" in k for k in report["figures"])

    # Interruption: ddpm's evaluation is lost; ambient-0.5's data is damaged and its training
    # must be redone. The rerun skips ddpm's training, redoes its evaluation, reports the
    # failed run and still writes the report.
    train_log = runs["ddpm"] / "train.log"
    log_size = train_log.stat().st_size
    (runs["ddpm"] / "study-eval.json").unlink()
    (runs["ambient-0.5"] / "study-train.json").unlink()
    tar = next((out / "shards").glob("n12-tn0.5-seed0-*/train-*.tar"))
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    capsys.readouterr()
    # A failed run makes the study exit 1 (it ran, but not everything), naming the run.
    assert study.main([str(path), "--out", str(out), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    printed = captured.out
    assert "ambient-0.5-n12-s0: train FAILED" in printed
    assert "error: 1 run failed: ambient-0.5-n12-s0 (train: RuntimeError" in captured.err
    assert train_log.stat().st_size == log_size                     # ddpm was not retrained
    assert (runs["ddpm"] / "study-eval.json").is_file()              # ...but re-evaluated
    assert (runs["ambient-0.5"] / "study-failed.json").is_file()
    again = json.loads((out / "report.json").read_text())
    assert [r["run"] for r in again["rows"]] == ["ddpm"]
    assert "checksum mismatch" in again["failures"]["ambient-0.5-n12-s0"]
    assert again["rows"][0]["kid"]["values"] == by_run["ddpm"]["kid"]["values"]
    assert "## Failed runs" in (out / "report.md").read_text()

    # A longer schedule: ddpm continues from its checkpoint (not from scratch), and its samples,
    # made from the shorter run's weights, are replaced rather than reused.
    longer = {**TOY, "runs": TOY["runs"][:1],
              "overrides": [o.replace("train.total_kimg=0.096", "train.total_kimg=0.128")
                            for o in TOY["overrides"]]}
    old_sha = json.loads((runs["ddpm"] / "samples" / "samples.json").read_text())["weights_sha"]
    assert study.main([str(write(tmp_path, longer, "longer.yaml")), "--out", str(out), "--device", "cpu"]) == 0
    log = train_log.read_text()
    assert "resuming from" in log and "at 96 images" in log
    assert json.loads((runs["ddpm"] / "study-train.json").read_text())["images"] == 128
    new_sha = json.loads((runs["ddpm"] / "samples" / "samples.json").read_text())["weights_sha"]
    assert new_sha != old_sha
    assert json.loads((runs["ddpm"] / "study-eval.json").read_text())["weights_sha"] == new_sha


def test_study_file_overrides_keep_their_values_whole(tmp_path):
    """A study file's overrides go through the config's typed override parser: a str value
    keeps ' #' and YAML words literally; a number with trailing text is refused by key."""
    runs = [{"name": "a", "sigma_tn": 0.5, "overrides": ["description=no", "train.seed=010"]}]
    path = write(tmp_path, {**TOY, "overrides": TOY["overrides"] + ["train.run_root=W/exp #2/runs"],
                            "runs": runs})
    _, specs = load_study(path, out=str(tmp_path / "out"), check_source=False)
    cfg = specs[0].config
    assert (cfg.train.run_root, cfg.description, cfg.train.seed) == ("W/exp #2/runs", "no", 10)
    bad = write(tmp_path, {**TOY, "runs": [{"name": "b", "overrides": ["train.batch=16 # small"]}]})
    with pytest.raises(StudyError, match=r"runs\[b\] .*train.batch: expected an integer, got '16 # small'"):
        load_study(bad, out=str(tmp_path / "out"), check_source=False)
