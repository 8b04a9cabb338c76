"""Source readers, each fed small files written in that source's real on-disk format.

The writers live in tests/helpers.py (other test files use them too): they lay files out as
the originals are (idx headers, CIFAR batch pickles with bytes keys, img2dataset shards
written by webdataset's own TarWriter).
"""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import (cut_tar_after, jpeg_bytes, random_images, write_cifar10_dir, write_cifar100_tgz,
                     write_folder, write_img2dataset, write_mnist_dir, write_wds_tar)

from ambient_dist.data.sources import (FASHION_MNIST_DIR, SourceError, choose_subset, find_duplicates,
                                       fit_image, open_source, read_idx, resolve_duplicates)


def test_idx_gz_and_plain(tmp_path):
    for gz in (True, False):
        d = write_mnist_dir(tmp_path / f"mnist{gz}", gz=gz)
        src = open_source(str(d))
        assert src.kind == "idx" and len(src) == 40 and src.num_classes == 10
        assert src.key(3) == "train-00003" and src.label(3) == 3
        rec = src.load(5)
        raw = read_idx(next(d.glob("train-images*")))
        assert rec.image.shape == (28, 28, 1) and np.array_equal(rec.image[:, :, 0], raw[5])
        test = open_source(str(d), split="test")
        assert len(test) == 10 and test.key(0) == "t10k-00000"


def test_idx_truncated_is_an_error(tmp_path):
    d = write_mnist_dir(tmp_path / "m", gz=False)
    p = d / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(SourceError, match="train-images-idx3-ubyte.*truncated"):
        open_source(str(d))


def test_fashion_mnist_shortcut():
    src = open_source("fashion-mnist")
    assert src.kind == "idx" and len(src) == 60000 and src.num_classes == 10
    assert str(src.path).startswith(FASHION_MNIST_DIR)
    assert open_source("fashion-mnist-test").key(0) == "t10k-00000"


def test_cifar10_batches(tmp_path):
    d = write_cifar10_dir(tmp_path / "cifar-10-batches-py")
    src = open_source(str(d))
    assert src.kind == "cifar" and len(src) == 30 and src.num_classes == 10
    assert src.class_names[3] == "class3"
    assert src.key(7) == "data_batch_2-00001"
    batch = pickle.loads((d / "data_batch_2").read_bytes(), encoding="bytes")
    rec = src.load(7)
    # Row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    assert np.array_equal(rec.image[:, :, 1], batch[b"data"][1][1024:2048].reshape(32, 32))
    assert rec.label == batch[b"labels"][1]
    assert len(open_source(str(d), split="test")) == 6


def test_cifar100_targz(tmp_path):
    src = open_source(str(write_cifar100_tgz(tmp_path / "cifar-100-python.tar.gz")))
    assert src.num_classes == 100 and len(src) == 12 and src.key(0) == "train-00000"


def test_cifar_pickle_cannot_run_code(tmp_path):
    d = write_cifar10_dir(tmp_path / "c")

    class Evil:
        def __reduce__(self):
            return (eval, ("1 + 1",))
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(SourceError, match=r"data_batch_1.*refusing to load .*eval"):
        open_source(str(d))


def test_npz_layouts(tmp_path):
    imgs = random_images(6, 16, 16, 3)
    np.savez(tmp_path / "a.npz", images=imgs.transpose(0, 3, 1, 2), labels=np.arange(6) % 3,
             keys=np.array([f"img.{k}" for k in range(6)]))
    src = open_source(str(tmp_path / "a.npz"))
    assert src.num_classes == 3 and src.key(2) == "img_2"
    assert np.array_equal(src.load(2).image, imgs[2])
    np.savez(tmp_path / "b.npz", x=imgs[..., 0])
    src = open_source(str(tmp_path / "b.npz"))
    assert src.load(0).image.shape == (16, 16, 1) and src.key(0) == "0000000" and src.num_classes == 0
    np.savez(tmp_path / "c.npz", images=imgs.astype(np.float32))
    with pytest.raises(SourceError, match="c.npz.*uint8"):
        open_source(str(tmp_path / "c.npz"))


def test_folder_with_classes_and_bad_image(tmp_path):
    d = write_folder(tmp_path / "imgs")
    src = open_source(str(d), class_from_folder=True)
    assert len(src) == 6 and src.class_names == ["cat", "dog"] and src.num_classes == 2
    assert src.key(0) == "cat_cat_0" and src.label(4) == 1
    assert src.load(1).image.shape == (20, 24, 3)
    (d / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    src = open_source(str(d), class_from_folder=True)
    bad = src.files.index("dog/broken.png")
    with pytest.raises(SourceError, match=r"dog/broken\.png: cannot decode image"):
        src.load(bad)


def test_img2dataset_shards(tmp_path):
    d = write_img2dataset(tmp_path / "laion")
    src = open_source(str(d))
    assert src.kind == "webdataset" and len(src) == 8 and src.num_classes == 0
    rec = src.load(4)
    assert rec.key == "000000004" and rec.caption == "caption 4" and rec.image.shape == (40, 30, 3)
    assert rec.meta["url"].startswith("http://127.0.0.1/")
    labelled = open_source(str(d), label_field="label")
    assert labelled.num_classes == 2 and labelled.label(3) == 1


def test_fit_pad_keeps_pixels_and_background():
    img = random_images(1, 28, 28, 1)[0]
    out = fit_image(img, 32, 1, "auto")
    assert out.shape == (32, 32, 1)
    assert np.array_equal(out[2:30, 2:30], img)
    assert out[:2].max() == 0 and out[:, :2].max() == 0  # 0 = -1 in model units
    with pytest.raises(SourceError, match="larger than 16; use --fit crop"):
        fit_image(img, 16, 1, "pad", where="x.png")


def test_fit_crop_and_channels():
    img = random_images(1, 40, 60, 3)[0]
    out = fit_image(img, 32, 3, "crop")
    assert out.shape == (32, 32, 3)
    assert fit_image(img, 32, 1, "crop").shape == (32, 32, 1)
    grey = random_images(1, 32, 32, 1)[0]
    rgb = fit_image(grey, 32, 3)
    assert np.array_equal(rgb[:, :, 0], grey[:, :, 0]) and np.array_equal(rgb[:, :, 2], grey[:, :, 0])


def test_subset_choice(tmp_path):
    src = open_source(str(write_mnist_dir(tmp_path / "m", n_train=100)))
    train, held = choose_subset(src, count=30, heldout=20, seed=7)
    assert len(train) == 30 and len(held) == 20 and not set(train) & set(held)
    assert (train, held) == choose_subset(src, count=30, heldout=20, seed=7)
    assert choose_subset(src, count=30, seed=8)[0] != train
    # The training list does not depend on how many are held out.
    assert choose_subset(src, count=30, heldout=0, seed=7)[0] == train
    per, held = choose_subset(src, per_class=3, heldout=5, seed=0)
    labels = [src.label(i) for i in per]
    assert sorted(labels) == sorted(list(range(10)) * 3) and not set(per) & set(held)
    with pytest.raises(SourceError, match="exceeds the 100 images"):
        choose_subset(src, count=90, heldout=20)
    with pytest.raises(SourceError, match="fewer images than that"):
        choose_subset(src, per_class=11)


def _save(path, array, mode=None, fmt=None):
    img = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    img.save(path, format=fmt)
    return path


def test_sixteen_bit_and_float_images_are_scaled_not_clipped_and_reported(tmp_path):
    """Field case: a 16-bit grey ramp PNG came out as two grey levels (PIL clips at 255)."""
    from ambient_dist.data.sources import decode_image_bytes
    ramp16 = np.tile(np.round(np.linspace(0, 65535, 32)), (32, 1)).astype(np.uint16)
    expect = np.rint(ramp16 / 257.0).astype(np.uint8)
    for name, array, fmt in [("ramp16.png", ramp16, "PNG"), ("ramp16.tif", ramp16, "TIFF"),
                             ("rampf.tif", ramp16.astype(np.float32) / 65535, "TIFF")]:
        notes = []
        got = decode_image_bytes(_save(tmp_path / name, array, fmt=fmt).read_bytes(), name, notes)
        assert got.shape == (32, 32, 1) and got.dtype == np.uint8
        assert np.array_equal(got[:, :, 0], expect), name
        assert len(np.unique(got)) > 30 and notes and ("16-bit" in notes[0] or "float" in notes[0])
    notes = []
    rgba = np.dstack([np.full((4, 4, 3), 200, np.uint8), np.zeros((4, 4), np.uint8)])
    got = decode_image_bytes(_save(tmp_path / "a.png", rgba).read_bytes(), "a.png", notes)
    assert (got == 200).all() and notes == ["RGBA -> RGB (alpha channel dropped)"]
    with pytest.raises(SourceError, match=r"b.tif: float image with values in \[2, 2\]; float images must be in \[0, 1\]"):
        decode_image_bytes(_save(tmp_path / "b.tif", np.full((4, 4), 2.0, np.float32), fmt="TIFF").read_bytes(), "b.tif")
    with pytest.raises(SourceError, match="c.tif: 32-bit integer image"):
        decode_image_bytes(_save(tmp_path / "c.tif", np.full((4, 4), 7, np.int32), fmt="TIFF").read_bytes(), "c.tif")


def test_sixteen_bit_folder_through_make_shards_keeps_the_ramp(tmp_path, capsys):
    from ambient_dist.data import load_images, read_manifest
    from helpers import load_launcher
    folder = tmp_path / "imgs"
    folder.mkdir()
    ramp16 = np.tile(np.round(np.linspace(0, 65535, 32)), (32, 1)).astype(np.uint16)
    _save(folder / "ramp.png", ramp16)
    out = tmp_path / "shards"
    rc = load_launcher("make_shards").main(["--source", str(folder), "--out", str(out), "--channels", "1",
                                            "--quiet"])
    assert rc == 0
    _, images, _ = load_images(out, "train")
    assert np.array_equal(images[0, :, :, 0], np.rint(ramp16 / 257.0).astype(np.uint8))
    manifest = read_manifest(out)
    assert manifest["converted"] == {"16-bit grey -> 8-bit (value / 257, rounded)": 1}
    assert manifest["counts"]["converted"] == 1
    assert "converted 1 images: 16-bit grey -> 8-bit" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------
# Duplicates: one key twice, or one whole sample under two keys (--duplicates)
# ----------------------------------------------------------------------------------------

def _sample(key, seed, caption=None):
    return {"__key__": key, "jpg": jpeg_bytes(seed), "txt": caption or f"caption {seed}"}


def _shards_of(source, tmp_path, policy, name="out"):
    from ambient_dist.data import ShardOptions, make_shards
    return make_shards(source, tmp_path / name, ShardOptions(resolution=8, duplicates=policy),
                       progress=False)


def test_a_key_written_twice_within_a_tar_is_two_samples_and_refused_by_default(tmp_path):
    tar = write_wds_tar(tmp_path / "wds" / "00000.tar",
                        [_sample("a", 1), _sample("b", 2), _sample("b", 3), _sample("c", 4)])
    src = open_source(str(tmp_path / "wds"))
    # Nothing merged: the second "b" is a sample of its own, with its own image and caption.
    assert [src.key(i) for i in range(len(src))] == ["a", "b", "b", "c"]
    assert src.load(1).caption == "caption 2" and src.load(2).caption == "caption 3"
    with pytest.raises(SourceError, match=rf"{tar} \(sample b, #3 in the tar\): repeats {tar} "
                                          r"\(sample b, #2 in the tar\) \(same key, another image, "
                                          r"key 'b'\); 1 duplicate samples .* --duplicates keep-first"):
        _shards_of(src, tmp_path, "error")


def test_members_without_an_image_are_named_never_dropped(tmp_path):
    """A key written again with only its caption (the field's case: exit 0, the second caption
    gone) and a caption whose image is missing are refused naming the members."""
    tar = write_wds_tar(tmp_path / "again" / "00000.tar",
                        [_sample("a", 1), _sample("b", 2), _sample("c", 3),
                         {"__key__": "b", "txt": "another caption"}])
    with pytest.raises(SourceError, match=rf"{tar}: member\(s\) b.txt hold no image .*: the key's "
                                          r"sample is there with an image too: the key was written "
                                          r"again without it .*; 1 such run\(s\)"):
        open_source(str(tmp_path / "again"))
    tar = write_wds_tar(tmp_path / "orphan" / "00000.tar",
                        [_sample("a", 1), {"__key__": "z", "txt": "no picture", "json": "{}"}])
    with pytest.raises(SourceError, match=rf"{tar}: member\(s\) z.json, z.txt hold no image .*: "
                                          r"no member of that key has an image"):
        open_source(str(tmp_path / "orphan"))


def test_keep_first_keeps_the_first_whole_and_lists_the_rest(tmp_path, capsys):
    from ambient_dist.data import load_images
    from ambient_dist.data.shards import ShardSet
    write_wds_tar(tmp_path / "wds" / "00000.tar", [_sample("a", 1), _sample("b", 2), _sample("b", 3)])
    src = open_source(str(tmp_path / "wds"))
    m = _shards_of(src, tmp_path, "keep-first")
    assert m["counts"]["train"] == 2 and m["counts"]["duplicates"] == 1
    assert m["duplicates_policy"] == "keep-first"
    [d] = m["duplicates"]
    assert d["key"] == "b" and "#3 in the tar" in d["where"] and "#2 in the tar" in d["first"]
    assert d["reason"] == "same key, another image"
    # The first "b" landed with its own caption (not the second's).
    shards = ShardSet(tmp_path / "out")
    b = shards.keys.index("b")
    assert json.loads(shards.raw(b)[2])["caption"] == "caption 2"
    keys, images, _ = load_images(tmp_path / "out")
    first_b = fit_image(src.load(1).image, 8, 3)
    assert np.array_equal(images[keys.index("b")], first_b)


def test_duplicates_across_tars_by_key_and_by_content(tmp_path):
    write_wds_tar(tmp_path / "wds" / "00000.tar", [_sample("a", 1), _sample("b", 2)])
    # Two overlapping downloads: "b" again, and the sample "a" again under another key.
    write_wds_tar(tmp_path / "wds" / "00001.tar", [_sample("b", 2), _sample("z", 1), _sample("d", 5)])
    src = open_source(str(tmp_path / "wds"))
    dups = find_duplicates(src)
    assert [(d["key"], d["reason"]) for d in dups] == [("b", "same key, same sample"),
                                                       ("z", "same sample under another key")]
    assert dups[0]["where"].endswith("00001.tar (sample b)") and dups[0]["first"].endswith("00000.tar (sample b)")
    assert dups[1]["first"].endswith("00000.tar (sample a)")
    with pytest.raises(SourceError, match=r"00001.tar \(sample b\): repeats .*00000.tar \(sample b\) "
                                          r"\(same key, same sample.*2 duplicate samples"):
        resolve_duplicates(src, "error")
    m = _shards_of(src, tmp_path, "keep-first")
    assert m["counts"]["train"] == 3 and m["counts"]["duplicates"] == 2
    # The same image with another caption is another sample, not a duplicate.
    write_wds_tar(tmp_path / "other" / "00000.tar", [_sample("a", 1), _sample("y", 1, "another caption")])
    assert find_duplicates(open_source(str(tmp_path / "other"))) == []


def test_folder_same_stem_in_two_extensions_nested_names_and_copies(tmp_path, capsys):
    from helpers import load_launcher
    d = tmp_path / "imgs"
    (d / "x").mkdir(parents=True)
    Image.fromarray(random_images(1, 8, 8, 3, seed=1)[0]).save(d / "a.png")
    Image.fromarray(random_images(1, 8, 8, 3, seed=2)[0]).save(d / "a.jpg")
    Image.fromarray(random_images(1, 8, 8, 3, seed=3)[0]).save(d / "x" / "b.png")
    Image.fromarray(random_images(1, 8, 8, 3, seed=4)[0]).save(d / "x_b.png")   # key x_b too
    (d / "x" / "c.jpg").write_bytes((d / "a.jpg").read_bytes())                # a copy of a.jpg
    src = open_source(str(d))
    got = {(Path(x["where"]).relative_to(d).as_posix(), Path(x["first"]).relative_to(d).as_posix(),
            x["reason"]) for x in find_duplicates(src)}
    assert got == {("a.png", "a.jpg", "same key, another image"),
                   ("x_b.png", "x/b.png", "same key, another image"),
                   ("x/c.jpg", "a.jpg", "same sample under another key")}
    main = load_launcher("make_shards").main
    assert main(["--source", str(d), "--out", str(tmp_path / "s"), "--resolution", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "a.png: repeats" in err and "a.jpg" in err \
        and "3 duplicate samples" in err and "--duplicates keep-first" in err
    assert main(["--source", str(d), "--out", str(tmp_path / "s"), "--resolution", "8", "--quiet",
                 "--duplicates", "keep-first"]) == 0
    out = capsys.readouterr().out
    assert "left out 3 duplicate source samples (--duplicates keep-first" in out
    assert f"{d / 'a.png'}: repeats {d / 'a.jpg'} (same key, another image)" in out


def test_array_sources_duplicates_by_key_and_content(tmp_path):
    images = random_images(5, 8, 8, 1)
    images[3] = images[1]
    np.savez(tmp_path / "a.npz", images=images, labels=np.array([0, 1, 0, 1, 1]))
    dups = find_duplicates(open_source(str(tmp_path / "a.npz")))
    assert [(d["key"], d["reason"]) for d in dups] == [("0000003", "same sample under another key")]
    # The same picture under another label is another sample.
    np.savez(tmp_path / "b.npz", images=images, labels=np.array([0, 1, 0, 0, 1]))
    assert find_duplicates(open_source(str(tmp_path / "b.npz"))) == []
    np.savez(tmp_path / "c.npz", images=random_images(3, 8, 8, 1), keys=np.array(["p", "q", "p"]))
    [d] = find_duplicates(open_source(str(tmp_path / "c.npz")))
    assert d["key"] == "p" and d["reason"] == "same key, another image"
    # idx (MNIST) and CIFAR batches are array sources too.
    mn = write_mnist_dir(tmp_path / "mnist", n_train=12, n_test=2)
    src = open_source(str(mn))
    assert find_duplicates(src) == []
    src.images, src.labels = src.images.copy(), src.labels.copy()
    src.images[7], src.labels[7] = src.images[2], src.labels[2]
    assert [d["key"] for d in find_duplicates(src)] == ["train-00007"]
    with pytest.raises(SourceError, match="--duplicates 'last'"):
        resolve_duplicates(src, "last")


# ----------------------------------------------------------------------------------------
# A tar that ends early
# ----------------------------------------------------------------------------------------

def test_a_source_tar_cut_at_a_member_boundary_is_refused_naming_what_is_missing(tmp_path):
    tar = write_wds_tar(tmp_path / "wds" / "00000.tar", [_sample(f"k{i}", i) for i in range(5)])
    whole = tar.read_bytes()
    cut = cut_tar_after(tar, 6)  # 3 whole samples (jpg + txt each)
    with pytest.raises(SourceError, match=rf"{tar}: the tar ends early: no end-of-archive marker .* "
                                          rf"at byte {cut} .*; 3 samples read, the last k2; the "
                                          "samples after it are missing"):
        open_source(str(tmp_path / "wds"))
    # With img2dataset's stats file the missing count is known.
    write_wds_tar(tar, [_sample(f"k{i}", i) for i in range(5)], stats=5)
    cut_tar_after(tar, 6)
    with pytest.raises(SourceError, match=r"3 samples read, the last k2; 00000_stats.json records "
                                          r"5 samples: 2 are missing"):
        open_source(str(tmp_path / "wds"))
    tar.write_bytes(whole)
    assert len(open_source(str(tmp_path / "wds"))) == 5


def test_a_source_tar_cut_inside_a_member_names_what_is_missing_too(tmp_path):
    """The usual end of a killed download: cut inside a member's data. Named as a cut between
    members is: what was read, the last sample, and the count missing."""
    import tarfile
    tar = write_wds_tar(tmp_path / "wds" / "00000.tar", [_sample(f"k{i}", i) for i in range(5)],
                        stats=5)
    with tarfile.open(tar) as t:
        jpg_of_k3 = [m for m in t.getmembers() if m.name == "k3.jpg"][0]
    tar.write_bytes(tar.read_bytes()[: jpg_of_k3.offset_data + jpg_of_k3.size // 2])
    with pytest.raises(SourceError, match=rf"{tar}: corrupt or truncated tar \(.*\); 3 samples "
                                          r"read, the last k2; 00000_stats.json records 5 samples: "
                                          r"2 are missing"):
        open_source(str(tmp_path / "wds"))


def test_a_stats_count_mismatch_is_refused(tmp_path):
    write_wds_tar(tmp_path / "wds" / "00000.tar", [_sample(f"k{i}", i) for i in range(4)], stats=6)
    with pytest.raises(SourceError, match=r"00000.tar: holds 4 samples with an image but "
                                          r"00000_stats.json records 6 successful downloads \(2 missing\)"):
        open_source(str(tmp_path / "wds"))
    write_wds_tar(tmp_path / "ok" / "00000.tar", [_sample(f"k{i}", i) for i in range(4)], stats=4)
    assert len(open_source(str(tmp_path / "ok"))) == 4


def test_a_truncated_cifar_archive_is_a_source_error(tmp_path):
    tgz = write_cifar100_tgz(tmp_path / "cifar-100-python.tar.gz")
    data = tgz.read_bytes()
    tgz.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"cifar-100-python.tar.gz: corrupt or truncated archive"):
        open_source(str(tgz), "cifar")
