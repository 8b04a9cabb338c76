"""ambient_dist.cli.posthoc_ema (ambient-posthoc-ema) and the `--ema FILE` of ambient-sample and
ambient-evaluate, on a toy run trained with ema.kind=power."""
import json
import re
from pathlib import Path

import pytest
import yaml

from ambient_dist.cli import evaluate as evaluate_cli
from ambient_dist.cli import posthoc_ema as posthoc_cli
from ambient_dist.cli import sample as sample_cli
from ambient_dist.cli import train as train_cli
from ambient_dist.config import load_config, to_dict
from ambient_dist.metrics.samples import file_digest
from helpers import toy_overrides

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def power_run(pixel_shards, tmp_path_factory) -> Path:
    """48 images of training with two power EMAs, snapshots at 16, 32 and 48 images."""
    root = tmp_path_factory.mktemp("power")
    cfg = load_config(None, toy_overrides(pixel_shards, root / "runs", **{
        "ema.kind": "power", "ema.snapshot_every_kimg": 0.016}))
    (root / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    assert train_cli.main(["--config", str(root / "config.yaml"), "name=power"]) == 0
    return root / "runs" / "power"


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_posthoc_ema_writes_each_sigma_rel_with_its_fit(power_run, capsys):
    assert posthoc_cli.main([str(power_run), "--sigma-rel", "0.05", "0.08", "0.12"]) == 0
    printed = capsys.readouterr().out
    for s in ("0.05", "0.08", "0.12"):
        path = power_run / "posthoc" / f"ema-{s}.safetensors"
        assert path.is_file() and f"sigma_rel {s}: {path}" in printed
        fit = json.loads(path.with_suffix(".json").read_text())
        assert fit["sigma_rel"] == float(s) and fit["images_seen"] == 48
    assert json.loads((power_run / "posthoc" / "ema-0.05.json").read_text())["fit_error"] < 1e-6
    assert posthoc_cli.main([str(power_run), "--sigma-rel", "0.08", "--at-kimg", "0.032"]) == 0
    assert (power_run / "posthoc" / "ema-0.08-at-0.032kimg.safetensors").is_file()


@pytest.mark.parametrize("args, message", [
    (["--sigma-rel", "0.3"], r"--sigma-rel 0.3: must be in \(0, 0.2887\)"),
    (["--sigma-rel", "0"], r"--sigma-rel 0.0: must be in \(0, 0.2887\)"),
    (["--sigma-rel", "0.05", "--at-kimg", "5"], "--at-kimg 5: beyond training; the last snapshot"),
    (["--sigma-rel", "0.05", "--at-kimg", "0.004"], "--at-kimg 0.004: no snapshot"),
])
def test_posthoc_ema_bad_requests_are_one_error_line(power_run, capsys, args, message):
    assert posthoc_cli.main([str(power_run), *args]) == 2
    assert re.search(message, one_error_line(capsys))


def test_posthoc_ema_of_a_run_without_snapshots_is_one_error_line(tmp_path, capsys):
    assert posthoc_cli.main([str(tmp_path), "--sigma-rel", "0.05"]) == 2
    assert "no EMA snapshots" in one_error_line(capsys)
    assert posthoc_cli.main([str(tmp_path / "nowhere"), "--sigma-rel", "0.05"]) == 2
    assert "nowhere: not found" in one_error_line(capsys)


def test_sample_and_evaluate_use_a_posthoc_ema_file(power_run, capsys):
    assert posthoc_cli.main([str(power_run), "--sigma-rel", "0.08"]) == 0
    ema = power_run / "posthoc" / "ema-0.08.safetensors"
    assert sample_cli.main([str(power_run), "--ema", str(ema), "--num", "2", "--batch", "2",
                            "--quiet"]) == 0
    made = json.loads((power_run / "samples-ema-0.08" / "samples.json").read_text())
    assert made["weights_sha"] == file_digest(ema) != file_digest(power_run / "ema.safetensors")
    assert evaluate_cli.main([str(power_run), "--ema", str(ema), "--num", "2", "--batch", "2",
                              "--no-fid", "--quiet", "--device", "cpu"]) == 0
    report = json.loads((power_run / "eval-ema-0.08" / "report.json").read_text())
    assert report["ema"] == str(ema) and report["samples"] == str(power_run / "samples-ema-0.08")
    assert not (power_run / "samples").exists()   # the run's own samples were not touched


def test_ema_flag_errors_are_one_error_line(power_run, tmp_path, capsys):
    ema = power_run / "posthoc" / "missing.safetensors"
    assert sample_cli.main([str(power_run), "--ema", str(ema), "--num", "1", "--quiet"]) == 2
    err = one_error_line(capsys)
    assert f"--ema {ema}: no such weights file" in err and "ambient-posthoc-ema" in err
    assert sample_cli.main([str(power_run), "--ema", str(power_run / "ema.safetensors"),
                            "--checkpoint", str(power_run / "ema.safetensors")]) == 2
    assert "not both" in one_error_line(capsys)
    assert evaluate_cli.main(["--samples", str(tmp_path), "--ema", str(power_run / "ema.safetensors")]) == 2
    assert "give the run directory and no --samples" in one_error_line(capsys)
    assert evaluate_cli.main([str(power_run), "--ema", str(ema), "--no-fid", "--quiet"]) == 2
    assert "no such weights file" in one_error_line(capsys)
