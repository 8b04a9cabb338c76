"""Shard writer, manifest, reader and every error the issue lists, on small real-format sources."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ambient_dist.config import ConfigError, load_config
from ambient_dist.data import load_images, read_manifest
from ambient_dist.data.shards import (ShardError, ShardOptions, ShardSet, check_manifest, encode_npy,
                                      make_shards, scan_tar, write_manifest)
from ambient_dist.data.sources import SourceError, choose_subset, open_source
from ambient_dist.fileio import atomic_write_json, sha256_file
from ambient_dist.noise import make_noisy_copy
from helpers import random_images, write_cifar10_dir, write_folder, write_mnist_dir

OPTS = dict(resolution=16, sigma_tn=0.5, count=20, heldout=6, samples_per_shard=8)


def npz_source(tmp_path, n=30, res=16, channels=3):
    path = tmp_path / "src.npz"
    np.savez(path, images=random_images(n, res, res, channels), labels=np.arange(n) % 5)
    return open_source(str(path))


def make(tmp_path, name="shards", **kw):
    opts = ShardOptions(**{**OPTS, **kw})
    out = tmp_path / name
    return out, make_shards(npz_source(tmp_path), out, opts, progress=False)


def test_manifest_and_noisy_copy_regenerates(tmp_path):
    out, m = make(tmp_path, noise_seed=3)
    assert m["complete"] and m["format_version"] == 1 and m["sigma_tn"] == 0.5 and m["form"] == "edm"
    assert (m["resolution"], m["channels"], m["num_classes"]) == (16, 3, 5)
    assert m["counts"] == {"train": 20, "heldout": 6, "skipped": 0, "duplicates": 0, "converted": 0}
    assert [e["samples"] for e in m["shards"]] == [8, 8, 4]  # shards need not divide evenly
    for e in m["shards"]:
        assert sha256_file(out / e["name"]) == e["sha256"] and (out / e["index"]).is_file()
    shards = ShardSet(out)
    for i in (0, 13):
        s = shards.sample(i)
        clean = torch.from_numpy(s.clean).float() / 127.5 - 1
        expected = make_noisy_copy(clean, 0.5, 3, s.key, "edm").numpy().astype(np.float16)
        assert s.noisy.dtype == np.float16 and np.array_equal(s.noisy, expected)
    noise = np.stack([(shards.sample(i).noisy.astype(np.float32) - shards.sample(i).clean / 127.5 + 1)
                      for i in range(len(shards))])
    assert abs(noise.std() - 0.5) < 0.02  # sigma in [-1, 1] units, not halved


def test_stored_order_is_the_seeded_subset(tmp_path):
    out, _ = make(tmp_path)
    keys, images, labels = load_images(out)
    src = npz_source(tmp_path)
    assert len(keys) == 20 and images.shape == (20, 16, 16, 3) and images.dtype == np.uint8
    idx = [int(k) for k in keys]
    assert idx != sorted(idx)  # shuffled: a prefix (data.subset) is itself a random subset
    assert all(np.array_equal(images[j], src.load(i).image) for j, i in enumerate(idx))
    assert list(labels) == [i % 5 for i in idx]


def test_heldout_is_disjoint(tmp_path):
    out, m = make(tmp_path)
    hk, himg, hlab = load_images(out, "heldout")
    tk, _, _ = load_images(out, "train")
    assert len(hk) == 6 and himg.shape == (6, 16, 16, 3) and not set(hk) & set(tk)
    assert m["heldout"]["sha256"] == sha256_file(out / "heldout.npz")


def test_rerun_skips_and_rewrites_only_damaged(tmp_path):
    out, m = make(tmp_path)
    stamps = {e["name"]: os.stat(out / e["name"]).st_mtime_ns for e in m["shards"]}
    damaged = out / m["shards"][1]["name"]
    data = bytearray(damaged.read_bytes())
    data[2000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    _, m2 = make(tmp_path)
    assert m2["shards"] == m["shards"]  # tars are reproducible byte for byte
    for name, stamp in stamps.items():
        same = os.stat(out / name).st_mtime_ns == stamp
        assert same == (name != damaged.name)
    with pytest.raises(ShardError, match="different source or options.*--overwrite"):
        make(tmp_path, sigma_tn=1.0)


def test_parallel_workers_write_identical_shards(tmp_path):
    _, m1 = make(tmp_path, "one", workers=1)
    _, m2 = make(tmp_path, "two", workers=2)
    assert [e["sha256"] for e in m1["shards"]] == [e["sha256"] for e in m2["shards"]]


def test_index_is_dalis_format_and_dali_reads_it(tmp_path):
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline
    out, m = make(tmp_path)
    name = m["shards"][0]["name"]
    lines = (out / m["shards"][0]["index"]).read_text().splitlines()
    assert lines[0] == "v1.2 8"
    key, comps = scan_tar(out / name)[0]
    assert lines[1].split()[:4] == ["png", str(comps["png"][0]), str(comps["png"][1]), f"{key}.png"]
    pipe = Pipeline(batch_size=8, num_threads=1, device_id=None)
    with pipe:
        png, npy = fn.readers.webdataset(paths=[str(out / name)], index_paths=[str(out / m["shards"][0]["index"])],
                                         ext=["png", "noisy.npy"], missing_component_behavior="error")
        pipe.set_outputs(png, npy)
    pipe.build()
    png, npy = pipe.run()
    shards = ShardSet(out)
    for i in range(8):
        ours = shards.raw(i)
        assert np.array(png[i]).tobytes() == ours[0] and np.array(npy[i]).tobytes() == ours[1]


def _cli():
    """launchers/make_shards.py's main (launchers/ is not a package)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "launchers" / "make_shards.py"
    spec = importlib.util.spec_from_file_location("make_shards_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.main


def test_make_shards_cli_fashion_mnist(tmp_path, capsys):
    main = _cli()
    out = tmp_path / "fm"
    assert main(["--source", "fashion-mnist", "--out", str(out), "--count", "12", "--heldout", "4",
                 "--samples-per-shard", "5", "--quiet"]) == 0
    assert "12 training images in 3 shards, 4 held out" in capsys.readouterr().out
    m = read_manifest(out)
    assert (m["resolution"], m["channels"], m["fit"]) == (32, 1, "auto")
    assert m["class_names"][9] == "Ankle boot" and m["source"]["name"] == "fashion-mnist"
    keys, images, _ = load_images(out)
    # 28x28 padded into 32x32 with background 0 (= -1).
    assert images.shape == (12, 32, 32, 1) and images[:, :2].max() == 0 and images[:, :, 30:].max() == 0
    assert main(["--source", "/nonexistent", "--out", str(out)]) == 2
    assert "/nonexistent: no such file" in capsys.readouterr().err


def test_make_shards_cli_config_and_named_format(tmp_path, capsys):
    main = _cli()
    cifar = write_cifar10_dir(tmp_path / "c")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("data: {subset: 7, resolution: 16, channels: 1}\nobjective: {sigma_tn: 1.5, form: vp}\n"
                   "network: {channel_mult: [1, 2]}\nevaluation: {heldout_images: 3}\n")
    assert main(["--config", str(cfg), "--source", "cifar10", "--path", str(cifar),
                 "--out", str(tmp_path / "s"), "--quiet"]) == 0
    m = read_manifest(tmp_path / "s")
    assert (m["sigma_tn"], m["form"], m["resolution"], m["channels"]) == (1.5, "vp", 16, 1)
    assert m["counts"]["train"] == 7 and m["counts"]["heldout"] == 3 and m["source"]["kind"] == "cifar"
    assert main(["--source", "cifar11", "--path", str(cifar), "--out", str(tmp_path / "x")]) == 2
    assert "expected a format name" in capsys.readouterr().err


def test_skip_bad_counts_and_lists(tmp_path):
    d = write_folder(tmp_path / "imgs", per_class=3)
    (d / "dog" / "zz_broken.png").write_bytes(b"garbage")
    src = open_source(str(d))
    opts = ShardOptions(resolution=16, samples_per_shard=4)
    with pytest.raises(SourceError, match="zz_broken.png: cannot decode image"):
        make_shards(src, tmp_path / "a", opts, progress=False)
    opts.skip_bad = True
    m = make_shards(src, tmp_path / "b", opts, progress=False)
    assert m["counts"]["train"] == 6 and m["counts"]["skipped"] == 1
    assert m["skipped"][0]["where"].endswith("dog/zz_broken.png")


# --------------------------------------------------------------------------------------------
# Errors when reading
# --------------------------------------------------------------------------------------------

def test_checksum_mismatch(tmp_path):
    out, m = make(tmp_path)
    p = out / m["shards"][2]["name"]
    data = bytearray(p.read_bytes())
    data[-10] = 1  # in the end-of-archive padding: only the checksum can tell
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{p.name}: checksum mismatch"):
        ShardSet(out)
    # Ranks split the verification: shard 2 is rank 0's of 2 (0, 2, ...), not rank 1's.
    ShardSet(out, verify_share=(1, 2))
    with pytest.raises(ShardError, match="checksum mismatch"):
        ShardSet(out, verify_share=(0, 2))


def test_truncated_tar(tmp_path):
    out, m = make(tmp_path)
    p = out / m["shards"][0]["name"]
    whole = p.read_bytes()
    p.write_bytes(whole[:4000])
    # Refused at open on every rank, checksums verified or not: the size the manifest records.
    with pytest.raises(ShardError, match=f"{p.name}: 4000 bytes, the manifest says {len(whole)} "
                                         r"\(cut short"):
        ShardSet(out, verify=False)
    m["shards"][0]["bytes"] = 4000  # past that check, a read names the truncated member
    write_manifest(out, m)
    shards = ShardSet(out, verify=False)
    with pytest.raises(ShardError, match=f"{p.name}, key {shards.keys[7]}: .*truncated"):
        shards.sample(7)
    (out / m["shards"][0]["index"]).unlink()  # without the index the tar is scanned
    with pytest.raises(ShardError, match=f"{p.name}: corrupt or truncated tar"):
        ShardSet(out, verify=False)


def test_our_tar_cut_at_a_member_boundary_is_refused_when_scanned(tmp_path):
    out, m = make(tmp_path)
    p = out / m["shards"][0]["name"]
    with tarfile.open(p) as tar:
        members = tar.getmembers()
    cut = members[9].offset  # after sample 3's three members: a whole-member prefix
    p.write_bytes(p.read_bytes()[:cut])
    with pytest.raises(ShardError, match=f"{p.name}: the tar ends early: no end-of-archive marker "
                                         f".* at byte {cut} .*; 3 samples read, the last "
                                         f"{members[8].name.split('.')[0]}, the rest are missing"):
        scan_tar(p)


def test_corrupt_tar_header(tmp_path):
    out, m = make(tmp_path)
    shards = ShardSet(out)
    p = out / m["shards"][0]["name"]
    offset = int(shards.table[3][2]) - 512  # header of sample 3's noisy copy
    data = bytearray(p.read_bytes())
    data[offset + 10: offset + 20] = b"XXXXXXXXXX"
    p.write_bytes(bytes(data))
    shards = ShardSet(out, verify=False)
    with pytest.raises(ShardError, match=f"key {shards.keys[3]}: corrupt tar header"):
        shards.sample(3)


def _rewrite_shard(out, m, edit):
    """Rewrite shard 0 with `edit(name, data) -> data or None (drop)`, fix index + checksum."""
    from ambient_dist.data.shards import write_index
    entry = m["shards"][0]
    p = out / entry["name"]
    members = []
    with tarfile.open(p) as tar:
        for info in tar:
            members.append((info.name, tar.extractfile(info).read()))
    with tarfile.open(p, "w") as tar:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    write_index(scan_tar(p), out / entry["index"])
    entry["sha256"], entry["bytes"] = sha256_file(p), p.stat().st_size
    write_manifest(out, m)  # as another writer would: sealed


def test_missing_noisy_copy(tmp_path):
    out, m = make(tmp_path)
    victim = ShardSet(out).keys[2]
    _rewrite_shard(out, m, lambda n, d: None if n == f"{victim}.noisy.npy" else d)
    with pytest.raises(ShardError, match=f"{m['shards'][0]['name']}, key {victim}: no noisy copy"):
        ShardSet(out)


@pytest.mark.parametrize("bad", ["dtype", "shape"])
def test_noisy_copy_wrong_dtype_or_shape(tmp_path, bad):
    out, m = make(tmp_path)
    victim = ShardSet(out).keys[1]

    def edit(name, data):
        if name != f"{victim}.noisy.npy":
            return data
        arr = np.load(io.BytesIO(data))
        return encode_npy(arr.astype(np.float32) if bad == "dtype" else arr[:, :8])
    _rewrite_shard(out, m, edit)
    shards = ShardSet(out)
    expected = "float32 \\[3, 16, 16\\]" if bad == "dtype" else "float16 \\[3, 8, 16\\]"
    with pytest.raises(ShardError, match=f"key {victim}: noisy copy is {expected}, expected float16 \\[3, 16, 16\\]"):
        shards.sample(1)


def test_empty_shard_list_and_incomplete_manifest(tmp_path):
    out, m = make(tmp_path)
    m["shards"] = []
    write_manifest(out, m)
    with pytest.raises(ShardError, match="shard list is empty"):
        ShardSet(out)
    m["complete"] = False
    write_manifest(out, m)
    with pytest.raises(ShardError, match="incomplete.*re-run the same make_shards"):
        ShardSet(out)
    with pytest.raises(ShardError, match="manifest.json: not found"):
        ShardSet(tmp_path)


def test_check_manifest_names_each_mismatch(tmp_path):
    out, m = make(tmp_path)
    ok = load_config(None, [f"data.shards={out}", "data.resolution=16", "data.channels=3",
                            "objective.sigma_tn=0.5", "network.channel_mult=[1,2]"])
    check_manifest(m, ok)
    for override, message in [("objective.sigma_tn=1.0", "objective.sigma_tn is 1.0, the shards' noisy copies have sigma_tn 0.5"),
                              ("data.resolution=32", "data.resolution is 32, shards are 16 px"),
                              ("data.channels=1", "data.channels is 1, shards have 3"),
                              ("data.num_classes=10", "data.num_classes is 10, shards have 5 classes"),
                              ("objective.form=vp", "objective.form is 'vp', shards were made for 'edm'"),
                              ("data.subset=50", "data.subset is 50 but the shards hold only 20")]:
        cfg = load_config(None, [f"data.shards={out}", "data.resolution=16", "data.channels=3",
                                 "objective.sigma_tn=0.5", "network.channel_mult=[1,2]", override])
        with pytest.raises(ConfigError, match=f"data.shards .*{message}"):
            check_manifest(m, cfg)


def test_idx_source_end_to_end(tmp_path):
    src = open_source(str(write_mnist_dir(tmp_path / "m", n_train=30)))
    m = make_shards(src, tmp_path / "out", ShardOptions(resolution=32, per_class=2, heldout=5,
                                                        samples_per_shard=7), progress=False)
    assert m["channels"] == 1 and m["counts"]["train"] == 20
    _, _, labels = load_images(tmp_path / "out")
    assert sorted(labels) == sorted(list(range(10)) * 2)


def test_interrupted_run_resumes(tmp_path):
    src = npz_source(tmp_path)
    opts = ShardOptions(**OPTS)
    third = choose_subset(src, OPTS["count"], 0, OPTS["heldout"], 0)[0][17]  # in the third shard
    good_load = src.load

    def failing_load(i):
        if i == third:
            raise SourceError(f"simulated crash at {src.key(i)}")
        return good_load(i)
    src.load = failing_load
    with pytest.raises(SourceError, match="simulated crash"):
        make_shards(src, tmp_path / "s", opts, progress=False)
    partial = read_manifest(tmp_path / "s", require_complete=False)
    assert not partial["complete"] and [e["name"] for e in partial["shards"]] == ["train-000000.tar", "train-000001.tar"]
    with pytest.raises(ShardError, match="incomplete"):
        ShardSet(tmp_path / "s")
    stamps = [os.stat(tmp_path / "s" / e["name"]).st_mtime_ns for e in partial["shards"]]
    src.load = good_load
    m = make_shards(src, tmp_path / "s", opts, progress=False)
    assert m["complete"] and len(m["shards"]) == 3
    assert [os.stat(tmp_path / "s" / e["name"]).st_mtime_ns for e in m["shards"][:2]] == stamps
    _, full = make(tmp_path, "fresh")
    assert [e["sha256"] for e in m["shards"]] == [e["sha256"] for e in full["shards"]]


def test_bright_images_are_valid_in_any_shard(tmp_path, capsys):
    """Field case: a shard holding only a bright image (every pixel 128..255) was refused as
    "looks like [0, 1] units". No statistic of the data decides validity any more."""
    from helpers import load_launcher
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k, (lo, hi) in enumerate([(0, 256), (128, 256), (0, 256)]):
        Image.fromarray(rng.integers(lo, hi, (16, 16, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    out = tmp_path / "shards"
    assert load_launcher("make_shards").main(["--source", str(folder), "--out", str(out), "--resolution",
                                              "16", "--samples-per-shard", "1", "--quiet"]) == 0
    _, images, _ = load_images(out, "train")
    assert len(images) == 3 and any(im.min() >= 128 for im in images)


def test_nan_in_a_stored_noisy_copy_is_named_where_it_is_read(tmp_path):
    """Field case: one float16 of one noisy copy set to NaN (checksum updated, as another
    writer would) silently skipped 2 of 16 steps. The reader now names the key."""
    out, m = make(tmp_path, count=8, heldout=0, samples_per_shard=8)
    tar_path = out / m["shards"][0]["name"]
    shards = ShardSet(out)
    key = shards.keys[3]
    with tarfile.open(tar_path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    rebuilt = tmp_path / "rebuilt.tar"
    with tarfile.open(rebuilt, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if info.name == f"{key}.noisy.npy":
                arr = np.load(io.BytesIO(data))
                arr[0, 2, 5] = np.nan
                data = encode_npy(arr)
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.replace(rebuilt, tar_path)
    (out / m["shards"][0]["index"]).unlink()     # rebuilt from the tar
    m["shards"][0]["sha256"] = sha256_file(tar_path)
    write_manifest(out, m)
    shards = ShardSet(out)
    with pytest.raises(ShardError, match=f"key {key}: noisy copy holds 1 non-finite values"):
        shards.sample(3)


def test_non_finite_data_is_refused_when_written(tmp_path):
    from ambient_dist.data.shards import finite_array
    with pytest.raises(ShardError, match="here: the noisy copy has 2 non-finite values"):
        finite_array(np.array([1.0, np.inf, np.nan], np.float16), "here", "noisy copy")
    ok = np.ones(3, np.float16)
    assert finite_array(ok, "here", "noisy copy") is ok


def test_a_shard_tar_is_published_whole_or_not_at_all(tmp_path):
    from ambient_dist.data.shards import ShardTar
    path = tmp_path / "train-000000.tar"
    with pytest.raises(RuntimeError):
        with ShardTar(path) as shard:
            shard.add("a.png", b"x")
            raise RuntimeError("source image failed to decode")
    assert list(tmp_path.iterdir()) == []  # neither the tar nor its temporary file
    with ShardTar(path) as shard:
        shard.add("a.png", b"x")
        shard.add("a.json", b"{}")
    entry = shard.publish([], None)
    assert entry["samples"] == 1 and entry["sha256"] == sha256_file(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.idx", "train-000000.tar"]


# ----------------------------------------------------------------------------------------
# The manifest's word against the data: the seal, and checks on the data themselves
# ----------------------------------------------------------------------------------------

def _edit(out, path, value):
    """Set field `path` ("counts.train", "shards.0.sha256") of out's manifest as a text editor
    would (the seal left as it was)."""
    m = json.loads((out / "manifest.json").read_text())
    *parents, last = path.split(".")
    node = m
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[int(last) if isinstance(node, list) else last] = value
    (out / "manifest.json").write_text(json.dumps(m))
    return m


@pytest.mark.parametrize("field, value, named", [
    ("sigma_tn", 1.0, "sigma_tn"), ("form", "vp", "form"), ("noise_seed", 3, "noise_seed"),
    ("resolution", 32, "resolution"), ("channels", 1, "channels"), ("num_classes", 10, "num_classes"),
    ("counts.train", 12, "counts.train"), ("plan", "0" * 64, "plan"), ("shards.0.sha256", "f" * 64, "shards"),
    ("masks.corruption", 0.2, "masks.corruption"), ("heldout.sha256", "0" * 64, "heldout.sha256")])
def test_an_edited_manifest_field_is_refused_naming_it(tmp_path, field, value, named):
    out, _ = make(tmp_path, mask_corruption=0.5)
    _edit(out, field, value)
    message = rf"manifest.json: manifest field {named} differs from what make_shards wrote"
    for read in (read_manifest, ShardSet, lambda d: load_images(d, "heldout")):
        with pytest.raises(ShardError, match=message):
            read(out)


def test_an_edited_sigma_tn_is_refused_by_the_training_loader_and_evaluation(tmp_path):
    from ambient_dist.data.build import build_loader
    out, _ = make(tmp_path)
    _edit(out, "sigma_tn", 1.0)
    cfg = load_config(None, [f"data.shards={out}", "data.resolution=16", "data.channels=3",
                             "objective.sigma_tn=1.0", "network.channel_mult=[1,2]", "train.batch=4"])
    for loader in ("resident", "webdataset"):
        cfg.data.loader = loader
        with pytest.raises(ShardError, match="manifest field sigma_tn differs"):
            build_loader(cfg, 0, 1, "cpu")


@pytest.mark.parametrize("field, value, message", [
    ("sigma_tn", 1.0, r"field sigma_tn says 1.0, but the stored noisy copies have noise std 0.5\d* "
                      r"\(expected 1; measured on 8 samples\)"),
    ("sigma_tn", 0.0, r"field sigma_tn says 0.0, but the stored noisy copies have noise std 0.5"),
    ("resolution", 32, r"field resolution says 32, but the stored images are 16x16 px"),
    ("channels", 1, r"field channels says 1, but the stored images have 3"),
    ("counts.train", 12, r"field counts.train says 12, but the tars hold 20 samples")])
def test_a_manifest_resealed_after_an_edit_is_still_refused_by_the_data(tmp_path, field, value, message):
    """Another tool that rewrites the manifest (and so its seal) cannot make it lie: what the
    data show is measured."""
    out, _ = make(tmp_path)
    write_manifest(out, _edit(out, field, value))
    read_manifest(out)  # the seal holds: it is the data that refuse
    with pytest.raises(ShardError, match=rf"manifest.json: {message}.*does not describe these shards"):
        ShardSet(out)


def test_the_data_checks_accept_every_true_manifest(tmp_path):
    for kw in (dict(sigma_tn=0.0), dict(sigma_tn=2.0), dict(form="vp", sigma_tn=0.5),
               dict(form="vp", sigma_tn=5.0), dict(count=1, heldout=0, resolution=8)):
        out, _ = make(tmp_path, name=f"s{len(list(tmp_path.iterdir()))}", **kw)
        assert len(ShardSet(out)) == (kw.get("count") or OPTS["count"])


def test_resealed_mask_corruption_is_refused_by_the_masks(tmp_path):
    from ambient_dist.data.shards import read_masks
    out, m = make(tmp_path, mask_corruption=0.5)
    keys = ShardSet(out).keys
    assert read_masks(out, keys).shape == (20, 3, 16, 16)
    write_manifest(out, _edit(out, "masks.corruption", 0.2))
    with pytest.raises(ShardError, match=r"field masks.corruption says 0.2, but the stored masks "
                                         r"erase 0.(4|5)\d* of the pixels \(20 masks\)"):
        read_masks(out, keys)


def test_an_unsealed_manifest_is_refused_and_resealed_by_rerunning_make_shards(tmp_path):
    out, m = make(tmp_path)
    stamps = {e["name"]: os.stat(out / e["name"]).st_mtime_ns for e in m["shards"]}
    del m["seal"]  # as shards made before manifests were sealed
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="manifest.json: the manifest carries no seal .* re-run the "
                                         "ambient-make-shards command"):
        ShardSet(out)
    again = make_shards(npz_source(tmp_path), out, ShardOptions(**OPTS), progress=False)
    assert {e["name"]: os.stat(out / e["name"]).st_mtime_ns for e in again["shards"]} == stamps
    assert len(ShardSet(out)) == 20 and read_manifest(out)["plan"] == m["plan"]


@pytest.mark.parametrize("field, value, message", [
    ("counts.heldout", 4, r"field counts.heldout says 4, but heldout.npz holds 6 images"),
    ("resolution", 8, r"fields resolution / channels say 8 px x 3, but heldout.npz holds images of shape \[16, 16, 3\]")])
def test_held_out_images_are_checked_against_a_resealed_manifest(tmp_path, field, value, message):
    out, _ = make(tmp_path)
    write_manifest(out, _edit(out, field, value))
    with pytest.raises(ShardError, match=message):
        load_images(out, "heldout")


def test_an_unverified_cut_heldout_file_is_named(tmp_path):
    out, m = make(tmp_path)
    p = out / "heldout.npz"
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(ShardError, match=r"heldout.npz: unreadable"):
        load_images(out, "heldout", verify=False)


def test_training_on_an_edited_manifest_is_one_error_line(tmp_path, capsys):
    """Field case: sigma_tn edited 0.5 -> 1.0 after the shards were written; ambient-train
    (with objective.sigma_tn=1.0, as the edit suggests) ran at the edited value, exit 0."""
    from ambient_dist.cli.train import main as train
    out, _ = make(tmp_path)
    _edit(out, "sigma_tn", 1.0)
    (tmp_path / "exp.yaml").write_text("{}\n")
    rc = train(["--config", str(tmp_path / "exp.yaml"), f"data.shards={out}", "data.resolution=16", "data.channels=3", "objective.sigma_tn=1.0",
                "network.channel_mult=[1,2]", f"train.run_root={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "manifest field sigma_tn differs" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_make_shards_cli_names_a_truncated_source_tar(tmp_path, capsys):
    from helpers import cut_tar_after, jpeg_bytes, write_wds_tar
    tar = write_wds_tar(tmp_path / "wds" / "00000.tar",
                        [{"__key__": f"k{i}", "jpg": jpeg_bytes(i), "txt": "c"} for i in range(4)], stats=4)
    cut_tar_after(tar, 4)
    assert _cli()(["--source", str(tmp_path / "wds"), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{tar}: the tar ends early" in err
    assert "2 samples read, the last k1; 00000_stats.json records 4 samples: 2 are missing" in err
