"""launchers/evaluate.py end to end at toy size: shards + run -> samples -> report with figures.

A small TorchScript CNN stands in for Inception (through --inception-path, the real loading
path); memorization uses pixel features. Figures are checked to be real, decodable PNGs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ambient_dist.config import load_config
from ambient_dist.data import ShardOptions
from ambient_dist.metrics import report as rep
from helpers import load_launcher, random_grey_shards, write_toy_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


evaluate_launcher = load_launcher("evaluate")
sample_launcher = load_launcher("sample")


class StandIn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 9, stride=8)

    def forward(self, x):
        return self.conv(x).tanh().mean((2, 3))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    random_grey_shards(root, 30, 8, ShardOptions(resolution=8, channels=1, sigma_tn=0.5, count=24,
                                                 heldout=6, samples_per_shard=12))
    runs = {}
    for name, sigma_tn in (("edm", 0.0), ("ambient", 1.0)):
        cfg = load_config(None, [f"data.shards={root / 'shards'}", "data.resolution=8", "data.channels=1",
                                 "data.subset=16", "network.model_channels=8", "network.channel_mult=[1,2]",
                                 "network.num_blocks=1", "network.attn_resolutions=[]", "sampling.steps=2",
                                 f"objective.sigma_tn={sigma_tn}", f"name={name}",
                                 "evaluation.memorization_features=pixels", "evaluation.heldout_images=6"])
        runs[name] = write_toy_run(cfg, root / name, seed=len(name))
    torch.jit.script(StandIn().eval()).save(str(root / "standin.pt"))
    return root, runs


def check_png(path: Path, min_side: int = 16) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()  # a complete, valid PNG
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side
        assert np.asarray(im.convert("L")).std() > 0  # not a blank canvas


@pytest.fixture(scope="module")
def evaluated(setup):
    """Both runs evaluated: "edm" as the baseline, "ambient" against it, with a comparison."""
    root, runs = setup
    common = ["--num", "6", "--batch", "4", "--inception-path", str(root / "standin.pt"),
              "--cache-dir", str(root / "cache"), "--quiet"]
    # the baseline run: samples made by evaluate itself (no samples/ yet)
    assert evaluate_launcher.main([str(runs["edm"]), *common]) == 0
    base_dir = runs["edm"] / "eval"
    # the ambient run: sample.py first (the documented two commands), then evaluate
    assert sample_launcher.main(["--run", str(runs["ambient"]), "--num", "6", "--quiet"]) == 0
    assert evaluate_launcher.main([str(runs["ambient"]), *common, "--baseline", str(base_dir),
                                   "--compare", str(base_dir)]) == 0
    return base_dir, runs["ambient"] / "eval"


def test_run_to_report_with_figures_baseline_and_comparison(setup, evaluated):
    root, _ = setup
    _, out = evaluated
    report = json.loads((out / "report.json").read_text())
    mem = report["memorization"]
    assert report["num_samples"] == 6 and report["sigma_tn"] == 1.0
    from ambient_dist.provenance import provenance  # what made the numbers, as run.json has it
    assert report["provenance"]["version"] == provenance()["version"] and report["provenance"]["torch"]
    assert mem["feature_space"] == "pixels-minus-mean" and mem["num_train"] == 16  # data.subset
    assert mem["heldout"]["count"] == 6 and len(mem["generated"]["max_similarity"]) == 6
    assert all(0 <= i < 16 for i in mem["generated"]["nearest_index"])
    fid = report["fid"]
    assert fid["value"] > 0 and fid["reference_count"] == 24  # every training-shard image
    assert fid["extractor"] == "inception-2015-12-05/pool3"
    assert report["baseline"]["name"] == "edm" and len(report["baseline"]["max_similarity"]) == 6
    assert [p["name"] for p in report["compare"]] == ["ambient", "edm"]
    assert len(list((root / "cache").glob("fidstats-*.npz"))) == 1  # reference stats cached, reused

    for name in ("samples.png", "nearest_pairs.png", "similarity_hist.png", "fid_vs_memorization.png"):
        check_png(out / "figures" / name)
    md = (out / "report.md").read_text()
    assert "FID" in md and "held-out (calibration)" in md and "baseline edm" in md
    for rel in report["figures"].values():
        assert f"]({rel})" in md and (out / rel).is_file()


def test_compare_only_and_samples_folder_mode(setup, evaluated, tmp_path):
    root, runs = setup
    assert evaluate_launcher.main(["--compare", str(runs["edm"] / "eval"), str(runs["ambient"] / "eval"),
                                   "--out", str(tmp_path / "sweep")]) == 0
    check_png(tmp_path / "sweep" / "figures" / "fid_vs_memorization.png")
    # --samples + --shards, no run directory, no FID; DINOv2-free so the note must name the space
    assert evaluate_launcher.main(["--samples", str(runs["edm"] / "samples"), "--train", str(root / "shards"),
                                   "--features", "pixels", "--no-fid", "--out", str(tmp_path / "e"),
                                   "--quiet"]) == 0
    report = rep.read_report(tmp_path / "e")
    assert report["fid"] is None and report["memorization"]["num_train"] == 24  # no subset known
    assert "pixels-minus-mean" in report["memorization"]["note"]


def test_sscd_space_and_precomputed_fid_statistics(setup, evaluated, tmp_path):
    root, runs = setup
    stats = sorted((root / "cache").glob("fidstats-*.npz"))[0]  # written by the first evaluation
    first = rep.read_report(runs["ambient"] / "eval")
    assert evaluate_launcher.main([str(runs["ambient"]), "--features", "sscd", "--sscd-path",
                                   str(root / "standin.pt"), "--inception-path", str(root / "standin.pt"),
                                   "--fid-reference", str(stats), "--out", str(tmp_path / "s"),
                                   "--quiet"]) == 0
    report = rep.read_report(tmp_path / "s")
    assert report["memorization"]["feature_space"] == "sscd/standin"
    # similarities of another feature space are never overlaid or plotted together
    assert evaluate_launcher.main(["--compare", str(tmp_path / "s"), str(runs["edm"] / "eval"),
                                   "--out", str(tmp_path / "mixed")]) == 2
    assert report["fid"]["reference"] == str(stats) and report["fid"]["reference_count"] == 24
    assert report["fid"]["value"] == pytest.approx(first["fid"]["value"], rel=1e-9)


def test_clear_errors(setup, tmp_path, capsys):
    root, _ = setup
    assert evaluate_launcher.main([]) == 2
    assert evaluate_launcher.main(["--samples", str(tmp_path), "--quiet"]) == 2
    assert "--shards" in capsys.readouterr().err
    assert evaluate_launcher.main(["--compare", str(tmp_path / "nope")]) == 2
    assert "report.json" in capsys.readouterr().err


def test_figures_directly():
    gen = torch.rand(5, 3, 8, 8) * 2 - 1
    train = (torch.rand(9, 3, 8, 8) * 255).to(torch.uint8)
    sims = [0.5, 0.99, 0.7, 0.1, 0.95]
    md = rep.markdown({"run": "x", "figures": {}})
    assert md.startswith("# Evaluation: x")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = rep.nearest_pairs_figure(gen, train, sims, [0, 1, 2, 3, 4], Path(d) / "p.png", top=3)
        check_png(p)
        h = rep.similarity_histogram({"a": sims, "b": [0.2, 0.3]}, [0.9, 0.95], Path(d) / "h.png")
        check_png(h)
        assert not list(Path(d).glob(".*tmp*"))  # written via temp file + rename


def _evaluate_as_rank(rank, world, port, argv):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    module = load_launcher("evaluate")
    assert module.main(argv) == 0


def test_two_rank_evaluation_equals_one_rank(setup, evaluated, tmp_path):
    import socket

    import torch.multiprocessing as mp
    root, runs = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["--samples", str(runs["edm"] / "samples"), "--shards", str(root / "shards"),
            "--features", "pixels", "--inception-path", str(root / "standin.pt"),
            "--cache-dir", str(tmp_path / "cache"), "--batch", "2", "--quiet", "--device", "cpu"]
    mp.spawn(_evaluate_as_rank, args=(2, port, argv + ["--out", str(tmp_path / "two")]), nprocs=2, join=True)
    assert evaluate_launcher.main(argv + ["--out", str(tmp_path / "one"), "--cache-dir",
                                          str(tmp_path / "cache1")]) == 0
    two, one = rep.read_report(tmp_path / "two"), rep.read_report(tmp_path / "one")
    for key in ("max_similarity", "nearest_index"):
        assert two["memorization"]["generated"][key] == pytest.approx(one["memorization"]["generated"][key], abs=1e-6)
        assert two["memorization"]["heldout"][key] == pytest.approx(one["memorization"]["heldout"][key], abs=1e-6)
    assert two["fid"]["value"] == pytest.approx(one["fid"]["value"], rel=1e-6, abs=1e-6)
    assert two["fid"]["reference_count"] == one["fid"]["reference_count"] == 24


def test_samples_are_checked_against_what_their_record_says(setup, tmp_path, capsys):
    """Field cases: (a) samples of older weights were reused after training continued, (b) a
    folder missing 5 of its 12 samples was reported on 7, (c) --num 6 with 12 present was refused."""
    import shutil

    from safetensors.torch import load_file, save_file
    root, runs = setup
    run = tmp_path / "run"
    shutil.copytree(runs["edm"], run, ignore=shutil.ignore_patterns("samples", "eval"))
    common = ["--batch", "4", "--inception-path", str(root / "standin.pt"), "--cache-dir",
              str(root / "cache"), "--quiet"]
    assert sample_launcher.main(["--run", str(run), "--num", "12", "--quiet"]) == 0
    # (c) a smaller --num uses the first 6 of the 12; the record still says 12
    assert evaluate_launcher.main([str(run), "--num", "6", *common]) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["num_samples"] == 6
    assert json.loads((run / "samples" / "samples.json").read_text())["num"] == 12
    # (b) PNGs deleted from a run's samples are made again; from a bare folder they are refused
    pngs = sorted((run / "samples").rglob("*.png"))
    kept = tmp_path / "folder"
    shutil.copytree(run / "samples", kept)
    for p in pngs[:5]:
        p.unlink()
    assert evaluate_launcher.main([str(run), *common]) == 0
    assert json.loads((run / "eval" / "report.json").read_text())["num_samples"] == 12
    assert len(list((run / "samples").rglob("*.png"))) == 12
    for p in sorted(kept.rglob("*.png"))[:5]:
        p.unlink()
    capsys.readouterr()
    assert evaluate_launcher.main(["--samples", str(kept), "--train", str(root / "shards"), *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {kept}: 7 samples there, but 12") and "Traceback" not in err
    # (a) the run trained on: its EMA changed, so its samples are of other weights
    weights = load_file(str(run / "ema.safetensors"))
    save_file({k: v.contiguous() for k, v in perturb_state(weights).items()}, str(run / "ema.safetensors"))
    assert evaluate_launcher.main([str(run), *common]) == 2
    err = capsys.readouterr().err
    assert "holds samples of other weights" in err and "--resample" in err and "Traceback" not in err
    assert evaluate_launcher.main([str(run), "--resample", *common]) == 0
    meta = json.loads((run / "samples" / "samples.json").read_text())
    from ambient_dist.metrics.samples import file_digest
    assert meta["weights_sha"] == file_digest(run / "ema.safetensors") and meta["num"] == 12


def perturb_state(state: dict) -> dict:
    g = torch.Generator().manual_seed(7)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in state.items()}


# --------------------------------------------------------------------------------------
# Issue 22: odd inputs (an image folder of any format, inputs of another shape)
# --------------------------------------------------------------------------------------

def _write_folder(folder: Path, images: np.ndarray, fmt: str, ext: str) -> Path:
    """images uint8 [N, H, W] or [N, H, W, 3] -> folder/img-<n>.<ext> in PIL format `fmt`."""
    folder.mkdir(parents=True)
    for n, im in enumerate(images):
        Image.fromarray(im).save(folder / f"img-{n:02d}.{ext}", format=fmt)
    return folder


def test_a_jpeg_folder_as_fid_reference_gives_the_fid_of_the_same_images_as_pngs(setup, evaluated, tmp_path):
    """Field case 1: a folder of JPEGs was read by a PNG-only reader ("no PNG files")."""
    root, runs = setup
    rng = np.random.default_rng(3)
    jpegs = _write_folder(tmp_path / "jpegs", (rng.random((12, 8, 8)) * 255).astype(np.uint8), "JPEG", "jpg")
    decoded = np.stack([np.asarray(Image.open(f)) for f in sorted(jpegs.glob("*.jpg"))])
    pngs = _write_folder(tmp_path / "pngs", decoded, "PNG", "png")  # the same pixels, lossless
    common = ["--samples", str(runs["edm"] / "samples"), "--shards", str(root / "shards"),
              "--features", "pixels", "--inception-path", str(root / "standin.pt"),
              "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    fids = {}
    for name, folder in (("jpeg", jpegs), ("png", pngs)):
        assert evaluate_launcher.main([*common, "--fid-reference", str(folder), "--out", str(tmp_path / name)]) == 0
        fids[name] = rep.read_report(tmp_path / name)["fid"]
    assert fids["jpeg"]["reference_count"] == fids["png"]["reference_count"] == 12
    assert fids["jpeg"]["value"] == pytest.approx(fids["png"]["value"], rel=1e-12)
    assert fids["jpeg"]["value"] != pytest.approx(rep.read_report(runs["edm"] / "eval")["fid"]["value"])


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("channels,side", [(3, 8), (3, 16), (1, 16)])
@pytest.mark.parametrize("space", ["pixels", "inception"])
def test_samples_of_another_shape_are_refused_naming_both_shapes(setup, tmp_path, capsys, channels, side, space):
    """Field case 2: 3-channel 32 / 64 px samples against 1-channel 32 px shards gave a
    RuntimeError traceback (pixel space); every feature space refuses them the same way."""
    root, _ = setup
    rng = np.random.default_rng(0)
    shape = (6, side, side, 3) if channels == 3 else (6, side, side)
    samples = _write_folder(tmp_path / "s", (rng.random(shape) * 255).astype(np.uint8), "PNG", "png")
    assert evaluate_launcher.main(["--samples", str(samples), "--shards", str(root / "shards"),
                                   "--features", space, "--inception-path", str(root / "standin.pt"),
                                   "--cache-dir", str(tmp_path / "cache"), "--quiet",
                                   "--out", str(tmp_path / "e")]) == 2
    err = _error(capsys)
    assert f"samples {samples}: images are [C, H, W] = [{channels}, {side}, {side}]" in err
    assert f"training shards {root / 'shards'} (--shards): [1, 8, 8]" in err
    assert not (tmp_path / "e").exists()  # refused before anything was computed or written


def test_fid_references_of_another_shape_are_refused_naming_both(setup, evaluated, tmp_path, capsys):
    root, runs = setup
    rng = np.random.default_rng(1)
    common = ["--samples", str(runs["edm"] / "samples"), "--shards", str(root / "shards"),
              "--features", "pixels", "--inception-path", str(root / "standin.pt"),
              "--cache-dir", str(tmp_path / "cache"), "--quiet", "--out", str(tmp_path / "e")]
    # an RGB JPEG folder against grey samples
    rgb = _write_folder(tmp_path / "rgb", (rng.random((6, 8, 8, 3)) * 255).astype(np.uint8), "JPEG", "jpeg")
    assert evaluate_launcher.main([*common, "--fid-reference", str(rgb)]) == 2
    err = _error(capsys)
    assert f"--fid-reference {rgb}: images are [C, H, W] = [3, 8, 8]" in err
    assert f"samples {runs['edm'] / 'samples'}: [1, 8, 8]" in err
    # shards of another resolution as the reference
    big = random_grey_shards(tmp_path, 12, 16, ShardOptions(resolution=16, channels=1, sigma_tn=0.5,
                                                           count=12, samples_per_shard=12))
    assert evaluate_launcher.main([*common, "--fid-reference", str(big)]) == 2
    assert f"--fid-reference {big}: images are [C, H, W] = [1, 16, 16]" in _error(capsys)
    # statistics we wrote record the images' shape: those of 16 px images are refused too
    from ambient_dist.metrics import fid as fidlib
    stats = tmp_path / "stats16.npz"
    fidlib.save_statistics(stats, np.zeros(8), np.eye(8), 12, image_shape=[1, 16, 16])
    assert evaluate_launcher.main([*common, "--fid-reference", str(stats)]) == 2
    err = _error(capsys)
    assert f"--fid-reference {stats}: statistics of images [C, H, W] = [1, 16, 16]" in err and "[1, 8, 8]" in err
    # EDM-style statistics (no image shape recorded) of another feature size name the file;
    # a file whose sigma is not [D, D] too
    edm_style = tmp_path / "dim64.npz"
    np.savez(edm_style, mu=np.zeros(64), sigma=np.eye(64))
    assert evaluate_launcher.main([*common, "--fid-reference", str(edm_style)]) == 2
    err = _error(capsys)
    assert f"--fid-reference {edm_style}: FID statistics of different feature sizes: (8,) vs (64,)" in err  # the stand-in's 8
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(4), sigma=np.eye(3))
    assert evaluate_launcher.main([*common, "--fid-reference", str(bad)]) == 2
    assert f"FID statistics {bad}: mu [4] and sigma [3, 3] are not a mean [D] and covariance [D, D]" in _error(capsys)
    # the statistics cached by an evaluation record the shape they were computed on
    cached = sorted((root / "cache").glob("fidstats-*.npz"))[-1]
    assert fidlib.recorded_image_shape(cached) == [1, 8, 8]


def test_baseline_and_compare_reports_of_another_space_or_shape_are_refused(setup, evaluated, tmp_path, capsys):
    import shutil
    root, runs = setup
    base_dir, ambient_dir = evaluated
    other = tmp_path / "other"
    shutil.copytree(base_dir, other)
    report = json.loads((other / "report.json").read_text())
    assert report["image_shape"] == [1, 8, 8]
    report["image_shape"] = [3, 16, 16]
    (other / "report.json").write_text(json.dumps(report))
    assert evaluate_launcher.main(["--compare", str(ambient_dir), str(other), "--out", str(tmp_path / "c")]) == 2
    err = _error(capsys)
    assert f"--compare {other} was evaluated on images [C, H, W] = [3, 16, 16]" in err
    assert f"--compare {ambient_dir} on [1, 8, 8]" in err
    assert evaluate_launcher.main([str(runs["ambient"]), "--num", "6", "--inception-path", str(root / "standin.pt"),
                                   "--cache-dir", str(root / "cache"), "--quiet", "--baseline", str(other),
                                   "--out", str(tmp_path / "b")]) == 2
    err = _error(capsys)
    assert f"--baseline {other} was evaluated on images [C, H, W] = [3, 16, 16], samples " in err
    assert "are [1, 8, 8]" in err


# --------------------------------------------------------------------------------------
# Issue 22 case 3: a run is evaluated on the data it was trained on, from any directory
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained (with checkpoints) from work/ on `data.shards=shards` (relative), and
    other/ holding other shards of the same name (another noise seed)."""
    import os

    from helpers import toy_overrides
    base = tmp_path_factory.mktemp("cwd")
    work, other = base / "work", base / "other"
    for folder, seed in ((work, 0), (other, 1)):
        folder.mkdir()
        random_grey_shards(folder, 30, 16, ShardOptions(resolution=16, channels=1, sigma_tn=0.5, count=24,
                                                        heldout=6, samples_per_shard=12, noise_seed=seed))
    before = os.getcwd()
    os.chdir(work)
    try:
        Path("exp.yaml").write_text("name: rel\n")
        overrides = toy_overrides(Path("shards"), Path("runs"), **{"data.subset": 20})
        assert load_launcher("train").main(["--config", "exp.yaml", *overrides]) == 0
    finally:
        os.chdir(before)
    return work, other, work / "runs" / "rel"


def test_a_run_evaluated_from_another_directory_uses_its_own_shards(trained, monkeypatch, tmp_path):
    work, other, run = trained
    saved = load_config(run / "config.yaml", check_paths=False)
    assert saved.data.shards == str(work / "shards") and saved.train.run_root == str(work / "runs")
    info = json.loads((run / "run.json").read_text())
    assert info["paths_as_typed"]["data.shards"] == "shards" and info["cwd"] == str(work)
    common = ["--num", "4", "--features", "pixels", "--no-fid", "--batch", "4", "--quiet"]
    reports = {}
    for cwd in (work, other):
        monkeypatch.chdir(cwd)
        assert evaluate_launcher.main([str(run), *common, "--out", str(tmp_path / cwd.name)]) == 0
        reports[cwd.name] = rep.read_report(tmp_path / cwd.name)
    for r in reports.values():
        assert r["shards"] == str(work / "shards") and r["memorization"]["num_train"] == 20
    assert reports["other"]["memorization"]["generated"]["max_similarity"] == \
        reports["work"]["memorization"]["generated"]["max_similarity"]
    # ambient-sample reads the same config.yaml: from a directory without any shards too
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    assert sample_launcher.main([str(run), "--num", "2", "--out", str(tmp_path / "s"), "--quiet"]) == 0


def test_a_run_is_not_evaluated_against_shards_it_was_not_trained_on(trained, monkeypatch, tmp_path, capsys):
    """The shards named (an override, --shards, or the run's own data.shards after they were
    remade) are checked against the data plan the run's checkpoint records, as resume does."""
    import shutil
    work, other, run = trained
    common = ["--num", "4", "--features", "pixels", "--no-fid", "--batch", "4", "--quiet",
              "--out", str(tmp_path / "e")]
    monkeypatch.chdir(other)
    assert evaluate_launcher.main([str(run), "data.shards=shards", *common]) == 2
    err = _error(capsys)
    assert f"data.shards of {run / 'config.yaml'} (shards) is not the data run {run} was trained on" in err
    assert "noise_seed 0 then, 1 now" in err and str(work / "shards") in err
    assert evaluate_launcher.main([str(run), "--shards", str(other / "shards"), *common]) == 2
    assert f"--shards ({other / 'shards'}) is not the data run" in _error(capsys)
    # the run's own shards replaced in place by others
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    replaced = tmp_path / "replaced"
    shutil.copytree(other / "shards", replaced)
    cfg_path = copy / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace(str(work / "shards"), str(replaced)))
    assert evaluate_launcher.main([str(copy), *common]) == 2
    err = _error(capsys)
    assert f"data.shards of {cfg_path} ({replaced}) is not the data run" in err and "noise_seed 0 then, 1 now" in err
    # checkpoints written before meta.json recorded the data: state.pt's loader state is read
    ckpt = copy / "checkpoints" / (copy / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["data"]["manifest_plan"] and meta["data"]["shards"] == str(work / "shards")
    del meta["data"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert evaluate_launcher.main([str(copy), *common]) == 2
    assert "noise_seed 0 then, 1 now" in _error(capsys)
    assert not (tmp_path / "e").exists()  # refused before anything was written
