"""The text task (ambient_dist.text.task) end to end: a few training steps through
launchers/train.py, resume, the diffusers export and the sample-text launcher on the trained run.

Single process here; test_text_task_deepspeed.py runs the text task on two DeepSpeed ranks.
The loss and the mitigations on their own: test_text_loss.py, test_text_mitigations.py.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from ambient_dist.text.sd_models import load_components

from helpers import RES

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------
# Training, export, sampling
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(latent_shards, tiny_model, tmp_path_factory):
    """Three steps of 4 through launchers/train.py, with both mitigations and the ambient branch."""
    sys.path.insert(0, str(ROOT / "launchers"))
    import train
    out, _, _ = latent_shards
    run = tmp_path_factory.mktemp("runs") / "laion-tiny"
    overrides = [f"data.shards={out}", "data.subset=0", f"data.resolution={RES}", f"text.model_path={tiny_model}",
                 "train.batch=4", "train.total_kimg=0.012", "train.log_every_kimg=0.004",
                 "train.checkpoint_every_kimg=0.008", "train.sample_every_kimg=100",
                 "train.precision=fp32", "optimizer.lr=1.0e-3", "sampling.num_images=2",
                 "text.sample_steps=2", "text.text_noise_std=0.1", "text.drop_threshold=1.0e+6",
                 "evaluation.memorization_features=pixels", "evaluation.heldout_images=2"]
    assert train.main(["--config", str(ROOT / "configs/laion-sd2-base.yaml"), "--run-dir", str(run),
                       *overrides]) == 0
    return run, overrides


def test_resumed_run_equals_uninterrupted(trained_run, tmp_path):
    """Two steps, stop, resume for the third: the same EMA bit for bit as three straight
    steps (caption dropout and embedding noise come from the saved noise generator)."""
    import train
    from safetensors.torch import load_file
    straight, overrides = trained_run
    run = tmp_path / "resumed"
    config = ["--config", str(ROOT / "configs/laion-sd2-base.yaml"), "--run-dir", str(run)]
    assert train.main([*config, *overrides, "train.total_kimg=0.008"]) == 0
    assert train.main([*config, "--resume", "auto", *overrides]) == 0
    a, b = load_file(straight / "ema.safetensors"), load_file(run / "ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_steps_write_checkpoints_and_report(trained_run, tiny_model):
    run, _ = trained_run
    latest = (run / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run / "checkpoints" / latest / "meta.json").read_text())
    assert meta["images_seen"] == 12 and meta["steps"] == 3 and meta["bad_steps"] == 0
    filtered = json.loads((run / "text_filter.json").read_text())
    assert filtered["samples"] == 12 and filtered["dropped"] == 0  # threshold 1e6 keeps all
    assert 0 < filtered["magnitude_percentiles"]["p50"] <= filtered["magnitude_percentiles"]["p99"]
    summary = json.loads((run / "memorization.json").read_text())
    assert summary["generated"]["count"] == 2 and summary["heldout"]["count"] == 2
    from safetensors.torch import load_file
    ema = load_file(run / "ema.safetensors")
    init = load_components(tiny_model, ("unet",)).unet.state_dict()
    assert ema.keys() == init.keys() and any(not torch.equal(ema[k], init[k]) for k in ema)


def test_export_loads_in_diffusers_pipeline_and_generates(trained_run):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    run, _ = trained_run
    export = run / "diffusers"
    pipe = StableDiffusionPipeline.from_pretrained(export, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    ema = load_file(run / "ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in pipe.unet.state_dict().items())
    image = pipe(["a cat"], height=RES, width=RES, num_inference_steps=1, output_type="np").images
    assert image.shape == (1, RES, RES, 3) and float(image.std()) > 0


def test_sample_text_launcher_writes_what_evaluate_reads_and_resumes(trained_run, tmp_path, capsys):
    import sample_text
    from ambient_dist.metrics.samples import read_samples
    run, _ = trained_run
    out = tmp_path / "samples"
    argv = [str(run), "--num", "3", "--steps", "1", "--batch", "2", "--out", str(out), "--quiet"]
    assert sample_text.main(argv) == 0 and "3 images written" in capsys.readouterr().out
    _, images, _ = read_samples(out)
    assert images.shape == (3, 3, RES, RES) and images.dtype == torch.uint8
    prompts = (out / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 3 and all(p.startswith("caption ") for p in prompts)
    assert sample_text.main(argv) == 0 and "0 images written" in capsys.readouterr().out
    assert sample_text.main([*argv[:-1], "--guidance", "2", "--quiet"]) == 2  # other settings: refused
    assert "made differently" in capsys.readouterr().err
    # The same settings as config overrides (the short flags are names for them): nothing new.
    overridden = [str(run), "--num", "3", "--batch", "2", "--out", str(out), "--quiet",
                  "text.sample_steps=1"]
    assert sample_text.main(overridden) == 0 and "0 images written" in capsys.readouterr().out
    assert sample_text.main([*overridden, "text.guidance_scale=2"]) == 2
    assert "made differently" in capsys.readouterr().err


def test_sample_text_on_a_bare_model_takes_only_the_samplers_overrides(trained_run, tmp_path, capsys):
    import sample_text
    run, _ = trained_run
    bare = [str(run / "diffusers"), "--prompts", str(tmp_path / "p.txt"), "--num", "1", "--quiet",
            "--out", str(tmp_path / "s")]
    (tmp_path / "p.txt").write_text("a cat\n")
    assert sample_text.main([*bare, "optimizer.lr=1"]) == 2
    assert "only the sampler's keys apply" in capsys.readouterr().err
    assert sample_text.main([*bare, "text.sample_steps=1", f"data.resolution={RES}"]) == 0
    from ambient_dist.metrics.samples import read_samples
    assert read_samples(tmp_path / "s")[1].shape == (1, 3, RES, RES)


def test_sample_text_refuses_training_captions_of_other_shards(trained_run, tmp_path, capsys):
    """Issue 22 case 3 for text runs: the prompts are the run's training captions, so the
    shards named are checked against the data its checkpoint records, as resume does."""
    import shutil

    import sample_text
    run, _ = trained_run
    from ambient_dist.config import load_config
    shards = Path(load_config(run / "config.yaml", check_paths=False).data.shards)
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["plan"] = "0" * len(manifest["plan"])  # as if made from other images or options
    from ambient_dist.data.shards import write_manifest
    manifest.pop("seal", None)
    write_manifest(other, manifest)  # sealed, as a writer of those other shards would have
    argv = [str(run), "--num", "1", "--steps", "1", "--out", str(tmp_path / "s"), "--quiet"]
    assert sample_text.main([*argv, f"data.shards={other}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: data.shards of {run / 'config.yaml'} ({other}) is not the data run {run}")
    assert "plan hash" in err and "Traceback" not in err and not (tmp_path / "s").exists()

def test_sample_text_says_what_the_model_replaces_of_the_config(trained_run, tmp_path, capsys, monkeypatch):
    """The scheduler's prediction type wins over text.prediction: said on screen and kept in
    samples.json's notes (issue 22, case 7)."""
    import sample_text
    from ambient_dist import progress
    monkeypatch.setattr(progress, "_SAID", set())
    run, _ = trained_run
    out = tmp_path / "samples"
    assert sample_text.main([str(run), "--num", "1", "--steps", "1", "--out", str(out), "--quiet",
                             "text.prediction=epsilon"]) == 0
    note = (f"text.prediction 'epsilon' replaced by 'v', the prediction type of "
            f"{run / 'diffusers' / 'scheduler'} (what the U-Net was trained for)")
    assert f"note: {note}\n" in capsys.readouterr().out
    meta = json.loads((out / "samples.json").read_text())
    assert meta["notes"] == [note] and meta["provenance"]["version"]
