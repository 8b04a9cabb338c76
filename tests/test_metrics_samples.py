"""launchers/sample.py: output independent of batch size and rank count, resume, both layouts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ambient_dist.config import load_config
from ambient_dist.metrics import samples as S
from helpers import load_launcher, write_toy_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


sample_launcher = load_launcher("sample")

TINY = {"data.resolution": 8, "data.channels": 1, "network.model_channels": 8,
        "network.channel_mult": "[1,2]", "network.num_blocks": 1, "network.attn_resolutions": "[]",
        "network.dropout": 0.0, "sampling.steps": 2}


def make_run(root: Path, **extra) -> Path:
    options = {**TINY, **extra}
    cfg = load_config(None, [f"{k}={v}" for k, v in options.items()])
    return write_toy_run(cfg, root / "run", seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("sample"))


def sample(run, out, *extra, env=None, monkeypatch=None):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, str(v))
    return sample_launcher.main([str(run), "--out", str(out), "--num", "7", "--quiet", *extra])


def test_images_do_not_depend_on_batch_size_or_rank_count(run, tmp_path, monkeypatch, capsys):
    assert sample(run, tmp_path / "a", "--batch", "7", monkeypatch=monkeypatch) == 0
    assert sample(run, tmp_path / "b", "--batch", "2", monkeypatch=monkeypatch) == 0
    # two ranks (torchrun variables) and three ranks (Open MPI variables), 2-image work blocks
    for r in range(2):
        assert sample(run, tmp_path / "c", "--batch", "3", "--shard-size", "2",
                      env={"RANK": r, "WORLD_SIZE": 2}, monkeypatch=monkeypatch) == 0
    for r in range(3):
        assert sample(run, tmp_path / "d", "--batch", "3", "--shard-size", "2",
                      env={"OMPI_COMM_WORLD_RANK": r, "OMPI_COMM_WORLD_SIZE": 3},
                      monkeypatch=monkeypatch) == 0
    idx_a, a, _ = S.read_samples(tmp_path / "a")
    assert idx_a == list(range(7)) and a.shape == (7, 1, 8, 8) and a.dtype == torch.uint8
    assert a.float().std() > 5  # real pictures, not a constant
    assert len({bytes(im.numpy()) for im in a}) == 7  # seven different images
    for other in ("b", "c", "d"):
        idx, x, _ = S.read_samples(tmp_path / other)
        assert idx == idx_a
        # the same seeds; float round-off of a different batch shape may move a pixel by one level
        assert (x.int() - a.int()).abs().max() <= 1, other
    meta = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert meta["num"] == 7 and meta["sampler"]["num_steps"] == 2 and meta["labels"] == "none"


def test_resume_skips_finished_images_and_refuses_a_different_sample_set(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert sample(run, out, "--batch", "3", monkeypatch=monkeypatch) == 0
    _, full, _ = S.read_samples(out)
    keep = S.SampleStore(out).png_path(0)
    stamp = keep.stat().st_mtime_ns
    # an interrupted run: two images missing and a half-written temp file left behind
    S.SampleStore(out).png_path(3).unlink()
    S.SampleStore(out).png_path(6).unlink()
    (out / "000000" / ".000003.png.tmp-999").write_bytes(b"partial")
    capsys.readouterr()
    assert sample(run, out, "--batch", "3", monkeypatch=monkeypatch) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert keep.stat().st_mtime_ns == stamp  # finished images are not redone
    _, resumed, _ = S.read_samples(out)
    assert torch.equal(resumed, full)
    # a different seed into the same folder would mix two sample sets: refused, named
    assert sample(run, out, "--seed", "5", monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err
    assert "seed" in err and str(out) in err


def test_webdataset_shards_with_class_labels_resume_per_shard(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path, **{"data.num_classes": 3})
    out = tmp_path / "wds"
    args = ("--format", "wds", "--shard-size", "3", "--batch", "2")
    assert sample(run, out, *args, monkeypatch=monkeypatch) == 0
    shards = sorted(out.glob("samples-*.tar"))
    assert [p.name for p in shards] == ["samples-000000.tar", "samples-000001.tar", "samples-000002.tar"]
    idx, x, labels = S.read_samples(out)
    assert idx == list(range(7)) and labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    shards[1].unlink()
    capsys.readouterr()
    assert sample(run, out, *args, monkeypatch=monkeypatch) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    _, again, _ = S.read_samples(out)
    assert torch.equal(again, x)
    # the same images as the PNG layout
    assert sample(run, tmp_path / "png", "--batch", "7", monkeypatch=monkeypatch) == 0
    _, png, _ = S.read_samples(tmp_path / "png")
    assert (png.int() - x.int()).abs().max() <= 1
    # a fixed class
    assert sample(run, tmp_path / "c2", "--class", "2", "--format", "wds", monkeypatch=monkeypatch) == 0
    assert S.read_samples(tmp_path / "c2")[2].tolist() == [2] * 7
    assert sample(run, tmp_path / "c9", "--class", "9", monkeypatch=monkeypatch) == 2
    assert "--class 9" in capsys.readouterr().err


def test_a_sample_shard_cut_or_doubled_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    """Sample shards are written whole; one cut between two members (a killed copy) or holding
    a member twice is refused naming the shard, not read as fewer or other samples."""
    import io
    import tarfile

    from helpers import cut_tar_after
    run = make_run(tmp_path)
    out = tmp_path / "wds"
    assert sample(run, out, "--format", "wds", "--shard-size", "4", "--batch", "2",
                  monkeypatch=monkeypatch) == 0
    first = out / "samples-000000.tar"
    whole = first.read_bytes()
    cut_tar_after(first, 2)
    with pytest.raises(S.SampleStoreError, match=r"samples-000000.tar: the tar ends early: no "
                       r"end-of-archive marker .*; 2 samples read, the rest are missing"):
        S.read_samples(out)
    first.unlink()  # what the message says to do: the sampler remakes the shard
    assert sample(run, out, "--format", "wds", "--shard-size", "4", "--batch", "2",
                  monkeypatch=monkeypatch) == 0
    assert first.read_bytes() == whole
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m, data in members + members[:1]:
            tar.addfile(m, io.BytesIO(data))
    first.write_bytes(buf.getvalue())
    with pytest.raises(S.SampleStoreError, match=f"samples-000000.tar: member {members[0][0].name} is there twice"):
        S.read_samples(out)


def test_explicit_checkpoint_and_clear_errors(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x"
    assert sample_launcher.main(["--config", str(run / "config.yaml"), "--checkpoint",
                                 str(run / "ema.safetensors"), "--out", str(out), "--num", "2",
                                 "--quiet"]) == 0
    assert len(list(out.rglob("*.png"))) == 2
    assert sample_launcher.main([str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "config" in capsys.readouterr().err
    assert sample_launcher.main(["--quiet"]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.SampleStoreError, match="no image files"):
        S.read_samples(tmp_path / "empty")


def test_a_run_killed_mid_way_resumes_to_the_same_images(run, tmp_path, monkeypatch, capsys):
    from ambient_dist import sampling
    assert sample(run, tmp_path / "ref", "--batch", "2", "--format", "wds", "--shard-size", "4",
                  monkeypatch=monkeypatch) == 0
    real = sampling.edm_sample
    calls = []

    def dies_on_third_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C or a pre-empted job looks like
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "edm_sample", dies_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        sample(run, tmp_path / "cut", "--batch", "2", "--format", "wds", "--shard-size", "4",
               monkeypatch=monkeypatch)
    # the first shard (images 0-3, two calls) was complete and is on disk; the second is not
    assert [p.name for p in sorted((tmp_path / "cut").glob("*.tar"))] == ["samples-000000.tar"]
    monkeypatch.setattr(sampling, "edm_sample", real)
    capsys.readouterr()
    assert sample(run, tmp_path / "cut", "--batch", "2", "--format", "wds", "--shard-size", "4",
                  monkeypatch=monkeypatch) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    assert torch.equal(S.read_samples(tmp_path / "cut")[1], S.read_samples(tmp_path / "ref")[1])


def test_any_image_folder_is_read_by_the_one_folder_reader(tmp_path):
    """Issue 22 case 1: sample folders (and FID reference folders) are read by
    data.sources.FolderSource, make_shards' reader: every format it reads, not only PNG."""
    import numpy as np
    from PIL import Image

    from ambient_dist.data.sources import FolderSource
    rng = np.random.default_rng(0)
    pixels = (rng.random((5, 8, 8, 3)) * 255).astype(np.uint8)
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    for n, (fmt, ext) in enumerate((("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp"),
                                    ("TIFF", "tif"))):
        Image.fromarray(pixels[n]).save(folder / ("sub" if n == 2 else "") / f"{n:06d}.{ext}", format=fmt)
    (folder / "samples.json").write_text("{}")  # bookkeeping files are not images
    (folder / "notes.txt").write_text("not an image")
    indices, images, labels = S.read_samples(folder)
    source = FolderSource(folder)
    assert len(source) == 5 and labels is None and images.shape == (5, 3, 8, 8)
    assert indices == [0, 1, 3, 4, 2]  # numbered files keep their number; sorted by path
    for i in range(5):
        assert torch.equal(images[i], torch.from_numpy(np.array(source.load(i).image)).permute(2, 0, 1))
    lossless = [0, 2, 3]  # png, bmp, tif (positions in path order)
    for pos, n in zip(lossless, (0, 3, 4)):
        assert torch.equal(images[pos], torch.from_numpy(pixels[n]).permute(2, 0, 1))


def test_image_folders_that_cannot_be_read_name_the_folder(tmp_path):
    from PIL import Image
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "samples.json").write_text("{}")
    with pytest.raises(S.SampleStoreError, match=rf"--fid-reference {empty}: no image files \(.png, .jpg"):
        S.read_samples(empty, what="--fid-reference")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.jpg")
    Image.new("L", (8, 8)).save(mixed / "b.png")
    with pytest.raises(S.SampleStoreError, match=r"samples .*: images of different shapes: \[H, W, C\] = "
                       r"\[8, 8, 1\] \(first: image 1\), \[H, W, C\] = \[8, 8, 3\] \(first: image 0\)"):
        S.read_samples(mixed)


def test_sampling_evaluating_or_reconstructing_into_a_run_in_use_is_refused(tmp_path, monkeypatch, capsys):
    """One owner per directory: ambient-sample (into the run), ambient-evaluate RUN and
    ambient-posthoc-ema write into the run directory, so a run a trainer or a study's worker
    holds is refused, naming the owner (field: an evaluation sampled 50,000 images from a
    half-trained run and broke the study's own sample stage)."""
    import subprocess
    import sys
    import textwrap
    run = make_run(tmp_path)
    hold = textwrap.dedent("""
        import sys, time
        from ambient_dist.locking import DirectoryLock
        lock = DirectoryLock(sys.argv[1], "run directory").acquire()  # kept: a dropped lock is released
        print("held", flush=True)
        time.sleep(600)
    """)
    owner = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        refused = f"error: run directory {run.resolve()} is in use by pid {owner.pid}"
        assert sample(run, run / "samples", monkeypatch=monkeypatch) == 2
        assert capsys.readouterr().err.startswith(refused)
        assert not (run / "samples").exists()
        assert load_launcher("evaluate").main([str(run), "--features", "pixels", "--no-fid",
                                               "--quiet"]) == 2
        assert capsys.readouterr().err.startswith(refused)
        assert load_launcher("posthoc_ema").main([str(run), "--sigma-rel", "0.05"]) == 2
        assert capsys.readouterr().err.startswith(refused)
        # Sampling elsewhere only reads the run: allowed while it trains.
        assert sample(run, tmp_path / "elsewhere", monkeypatch=monkeypatch) == 0
    finally:
        owner.kill()
        owner.wait()
    assert sample(run, run / "samples", monkeypatch=monkeypatch) == 0  # the owner is gone
