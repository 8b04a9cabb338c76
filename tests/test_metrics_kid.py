"""KID: the unbiased MMD^2 estimate against torchmetrics, its standard error, its behaviour."""
import pytest
import torch
from torch import nn

from ambient_dist.metrics.kid import kernel_inception_distance, mmd2_unbiased


class Identity(nn.Module):
    """torchmetrics' KID with our features as its 'feature extractor'."""
    def forward(self, x):
        return x


def test_kid_equals_torchmetrics_on_the_same_features():
    from torchmetrics.image.kid import KernelInceptionDistance
    g = torch.Generator().manual_seed(0)
    real = torch.randn(120, 16, generator=g)
    fake = torch.randn(120, 16, generator=g) * 1.3 + 0.2
    tm = KernelInceptionDistance(feature=Identity(), subsets=1, subset_size=120)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    mean, _ = tm.compute()
    ours = kernel_inception_distance(fake, real)
    assert ours["value"] == pytest.approx(float(mean), rel=1e-5, abs=1e-9)


def test_kid_is_unbiased_near_zero_for_the_same_distribution_and_grows_with_the_shift():
    g = torch.Generator().manual_seed(1)
    values = [mmd2_unbiased(torch.randn(60, 8, generator=g), torch.randn(200, 8, generator=g))
              for _ in range(200)]
    mean = sum(values) / len(values)
    se = torch.tensor(values).std().item() / len(values) ** 0.5
    assert abs(mean) < 3 * se                       # unbiased: averages to 0 (FID would not)
    assert min(values) < 0                          # and can be negative, as an unbiased estimate
    ref = torch.randn(300, 8, generator=g)
    kids = [kernel_inception_distance(torch.randn(200, 8, generator=g) + s, ref)["value"]
            for s in (0.0, 0.3, 0.6)]
    assert kids[0] < kids[1] < kids[2]


def test_kid_standard_error_matches_the_spread_of_repeated_estimates():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(400, 8, generator=g)
    runs = [kernel_inception_distance(torch.randn(200, 8, generator=g) + 0.3, ref) for _ in range(60)]
    spread = torch.tensor([r["value"] for r in runs]).std().item()
    typical_se = sorted(r["stderr"] for r in runs)[len(runs) // 2]
    assert 0.5 < typical_se / spread < 2.0
    assert runs[0]["blocks"] == 10 and runs[0]["num_samples"] == 200 and runs[0]["num_reference"] == 400
    with pytest.raises(ValueError, match="at least 2 images"):
        mmd2_unbiased(ref[:1], ref)


def test_kid_refuses_features_of_different_widths_naming_both():
    with pytest.raises(ValueError, match=r"generated features \[6, 4\] and reference features \[5, 8\]"):
        kernel_inception_distance(torch.randn(6, 4), torch.randn(5, 8))
