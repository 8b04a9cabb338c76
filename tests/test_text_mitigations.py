"""ambient_dist.text.mitigations: each changes what it should, and nothing when off."""
import pytest
import torch

from ambient_dist.noise import ddpm_alpha_sigma
from ambient_dist.text.mitigations import CaptionDropout, PredictionMagnitudeFilter, TextEmbeddingNoise

from helpers import gen


# --------------------------------------------------------------------------------------
# Mitigations: each changes what it should, and nothing when off
# --------------------------------------------------------------------------------------

def test_caption_dropout():
    cond, empty = torch.randn(4000, 3, 2, generator=gen(1)), torch.randn(1, 3, 2, generator=gen(2))
    same, dropped = CaptionDropout(0.0)(cond, empty, gen())
    assert same is cond and not dropped.any()
    out, dropped = CaptionDropout(0.25)(cond, empty, gen())
    assert 0.22 < dropped.float().mean() < 0.28
    assert torch.equal(out[dropped], empty.expand(int(dropped.sum()), 3, 2))
    assert torch.equal(out[~dropped], cond[~dropped])
    with pytest.raises(ValueError, match="caption_dropout"):
        CaptionDropout(1.0)


def test_text_embedding_noise():
    cond = torch.randn(64, 77, 32, generator=gen(1))
    assert TextEmbeddingNoise(0.0)(cond, gen()) is cond
    noisy = TextEmbeddingNoise(0.3)(cond, gen())
    assert abs(float((noisy - cond).std()) - 0.3) < 0.01
    assert torch.equal(noisy, TextEmbeddingNoise(0.3)(cond, gen()))  # from the given generator


def test_prediction_magnitude_is_in_epsilon_units():
    t = torch.tensor([10, 500, 990])
    z, cond, empty = torch.randn(3, 4, 4, 4), torch.randn(3, 5, 8), torch.zeros(1, 5, 8)
    net = lambda z_t, tt, c: z_t + c.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)  # noqa: E731
    out = net(z, t, cond)
    v = PredictionMagnitudeFilter(1.0, "v").magnitude(net, z, t, cond, empty, out)
    e = PredictionMagnitudeFilter(1.0, "epsilon").magnitude(net, z, t, cond, empty, out)
    expected = cond.mean(dim=(1, 2)).abs() * 8  # the difference is constant over 64 elements
    torch.testing.assert_close(e, expected)
    torch.testing.assert_close(v, expected * ddpm_alpha_sigma(t)[0].float())
    off, record = PredictionMagnitudeFilter(0.0, "v").wrap(net, empty)
    assert torch.equal(off(z, t, cond), out) and record == {}
