"""Source readers, each fed small files written in that source's real on-disk format.

The writers live in tests/helpers.py (other test files use them too): they lay files out as
the originals are (idx headers, CIFAR batch pickles with bytes keys, img2dataset shards
written by webdataset's own TarWriter).
"""
import pickle

import numpy as np
import pytest
from PIL import Image

from helpers import (random_images, write_cifar10_dir, write_cifar100_tgz, write_folder,
                     write_img2dataset, write_mnist_dir)

from ambient_dist.data.sources import (FASHION_MNIST_DIR, SourceError, choose_subset, fit_image,
                                       open_source, read_idx)


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
