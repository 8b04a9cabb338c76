"""metrics.assess, the one evaluation path: memorization per space, KID + FID against a
reference set (cached features), attraction passed through; uint8 and [-1, 1] inputs alike.
A small TorchScript CNN stands in for Inception (helpers.write_standin_inception, through
eval_cfg.inception_path)."""
import dataclasses

import pytest
import torch

from ambient_dist.config import EvaluationConfig
from ambient_dist.metrics import fid as fidlib
from ambient_dist.metrics.assess import QualityReference, assess
from ambient_dist.metrics.features import as_model_units, build_extractor, extract
from ambient_dist.metrics.kid import kernel_inception_distance
from ambient_dist.metrics.memorization import memorization_summary
from helpers import write_standin_inception

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("assess")
    write_standin_inception(root / "standin.pt")
    g = torch.Generator().manual_seed(1)
    pix = lambda n: torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)  # noqa: E731
    cfg = dataclasses.replace(EvaluationConfig(), inception_path=str(root / "standin.pt"),
                              memorization_features="pixels")
    return root, cfg, pix(10), pix(16), pix(6), pix(12)


def test_memorization_is_memorization_summary_in_each_space(inputs):
    _, cfg, generated, train, held, _ = inputs
    out = assess(generated, train, held, cfg, spaces=["pixels", "inception"])
    assert list(out["memorization"]) == ["pixels", "inception"]
    assert out["quality"] is None and out["attraction"] is None
    for space in ("pixels", "inception"):
        direct = memorization_summary(generated, train, held,
                                      dataclasses.replace(cfg, memorization_features=space))
        assert out["memorization"][space] == direct
    # default: the config's own space
    assert list(assess(generated, train, None, cfg)["memorization"]) == ["pixels"]


def test_quality_is_kid_and_fid_on_shared_features_and_the_cache_keeps_them(inputs, tmp_path):
    _, cfg, generated, train, held, reference = inputs
    ref = QualityReference(reference, "12 real images", tmp_path / "cache")
    out = assess(generated, train, held, cfg, spaces=["pixels"], quality=ref, batch=4)
    ex = build_extractor("inception", cfg.inception_path)
    g, r = extract(ex, generated, 4), extract(ex, reference, 4)
    assert out["quality"]["kid"] == kernel_inception_distance(g, r)
    (mu_g, s_g), (mu_r, s_r) = fidlib.feature_statistics(g), fidlib.feature_statistics(r)
    assert out["quality"]["fid"] == fidlib.frechet_distance(mu_g, s_g, mu_r, s_r)
    assert out["quality"]["reference"] == "12 real images"
    assert out["quality"]["kid"]["num_reference"] == 12 and out["quality"]["kid"]["num_samples"] == 10
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1
    again = assess(generated, train, held, cfg, spaces=["pixels"], quality=ref, batch=4)
    assert again["quality"] == out["quality"]
    other = QualityReference(reference[:8], "8 real images", tmp_path / "cache")
    assert assess(generated, train, held, cfg, quality=other)["quality"]["kid"]["num_reference"] == 8
    assert len(list((tmp_path / "cache").iterdir())) == 2   # another set, another cache file


def test_uint8_and_model_unit_images_give_the_same_numbers(inputs):
    _, cfg, generated, train, held, reference = inputs
    a = assess(generated, train, held, cfg, spaces=["pixels", "inception"],
               quality=QualityReference(reference, "r"))
    b = assess(as_model_units(generated), as_model_units(train), as_model_units(held), cfg,
               spaces=["pixels", "inception"], quality=QualityReference(as_model_units(reference), "r"))
    assert a == b


def test_attraction_is_called_once_and_reported_as_is(inputs):
    _, cfg, generated, train, held, _ = inputs
    calls = []
    out = assess(generated, train, held, cfg, attraction=lambda: calls.append(1) or {"count": 6})
    assert out["attraction"] == {"count": 6} and calls == [1]
