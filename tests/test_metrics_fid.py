"""FID against torchmetrics' independent computation, the reference-statistics cache, and the
SSCD stand-in extractor (the CLIP score is in test_metrics_clip_score.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ambient_dist.metrics import fid
from ambient_dist.metrics import features as feats


def random_stats(seed, d=24, n=200, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g,
                                                                          dtype=torch.float64)
    return fid.feature_statistics(x + shift)


def test_frechet_distance_equals_torchmetrics_on_the_same_statistics():
    from torchmetrics.image.fid import _compute_fid
    for seed, shift in ((0, 0.0), (1, 0.5), (2, 3.0)):
        mu1, s1 = random_stats(seed, shift=shift)
        mu2, s2 = random_stats(seed + 10)
        ours = fid.frechet_distance(mu1, s1, mu2, s2)
        theirs = _compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))).item()
        assert ours == pytest.approx(theirs, abs=1e-3, rel=1e-6)
        assert ours > 0
    mu, s = random_stats(5)
    assert fid.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-6)


def test_streamed_moments_equal_numpy_mean_and_covariance():
    x = torch.randn(50, 6, dtype=torch.float64) * 3 + 1
    m = fid.FeatureMoments(6)
    for part in x.split(7):
        m.update(part)
    mu, cov = m.statistics()
    np.testing.assert_allclose(mu, x.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x.numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        fid.FeatureMoments(3).statistics()


class StandIn(torch.nn.Module):
    """A small CNN in place of Inception (features of any image size)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, 3)

    def forward(self, x):
        return self.conv(x.float()).tanh().mean((2, 3))


def test_fid_pipeline_equals_torchmetrics_fid_with_the_same_extractor(tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance
    torch.manual_seed(0)
    torch.jit.script(StandIn().eval()).save(str(tmp_path / "standin.pt"))
    ex = feats.build_extractor("inception", str(tmp_path / "standin.pt"))
    real = torch.rand(40, 3, 8, 8) * 2 - 1
    fake = (torch.rand(30, 3, 8, 8) * 2 - 1) * 0.7 + 0.1

    class AsModule(torch.nn.Module):  # torchmetrics drives our extractor, then its own math
        # (at construction torchmetrics probes the feature size with one 299x299 image)
        def forward(self, x):
            return ex(x) if x.shape[-1] == 8 else ex(x[..., :8, :8] * 2 - 1)

    tm = FrechetInceptionDistance(feature=AsModule())
    tm.update(real, real=True)
    tm.update(fake, real=False)
    ref = fid.reference_statistics(ex, real.split(16), "realset", cache_dir=tmp_path)
    ours = fid.fid_against(ex, fake.split(7), ref)
    assert ours == pytest.approx(tm.compute().item(), abs=1e-3)


def test_stats_cache_tells_apart_two_files_of_the_same_network_name(tmp_path):
    torch.manual_seed(0)
    torch.jit.script(StandIn().eval()).save(str(tmp_path / "a.pt"))
    torch.jit.script(StandIn().eval()).save(str(tmp_path / "b.pt"))  # other random weights
    a = feats.build_extractor("inception", str(tmp_path / "a.pt"))
    b = feats.build_extractor("inception", str(tmp_path / "b.pt"))
    assert a.name == b.name and a.cache_key != b.cache_key
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    sa = fid.reference_statistics(a, images.split(3), "same-data", cache_dir=tmp_path / "c")
    sb = fid.reference_statistics(b, images.split(3), "same-data", cache_dir=tmp_path / "c")
    assert not np.allclose(sa[0], sb[0]) and len(list((tmp_path / "c").glob("*.npz"))) == 2


def test_reference_statistics_are_cached_by_extractor_and_dataset(tmp_path):
    ex = feats.PixelFeatures(torch.zeros(1, 2, 2))
    images = torch.rand(10, 1, 2, 2)
    first = fid.reference_statistics(ex, images.split(3), "abc123", cache_dir=tmp_path)
    files = list(tmp_path.glob("fidstats-*.npz"))
    assert len(files) == 1 and "pixels-minus-mean" in files[0].name and "abc123" in files[0].name

    def never():
        raise AssertionError("a cached reference set must not be embedded again")
        yield

    again = fid.reference_statistics(ex, never(), "abc123", cache_dir=tmp_path)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert again[2] == 10
    # reference files of EDM / StyleGAN hold mu and sigma only
    np.savez(tmp_path / "edm-ref.npz", mu=first[0], sigma=first[1])
    mu, sigma, count = fid.load_statistics(tmp_path / "edm-ref.npz")
    assert np.array_equal(mu, first[0]) and np.array_equal(sigma, first[1]) and count == 0
    np.savez(tmp_path / "bad.npz", mean=first[0])
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.load_statistics(tmp_path / "bad.npz")
    other = fid.reference_statistics(ex, (images + 1).split(5), "other", cache_dir=tmp_path)
    assert not np.allclose(other[0], first[0]) and len(list(tmp_path.glob("fidstats-*.npz"))) == 2


def test_sscd_stand_in_gives_normalisable_descriptors(tmp_path):
    torch.jit.script(StandIn().eval()).save(str(tmp_path / "sscd.pt"))
    ex = feats.build_extractor("sscd", str(tmp_path / "sscd.pt"))
    out = ex(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert out.shape == (2, 12) and torch.isfinite(out).all()
    with pytest.raises(feats.FeatureError, match="sscd"):
        feats.build_extractor("sscd", str(tmp_path / "missing.pt"))
