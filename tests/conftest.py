"""Fixtures shared by several test files. Plain helpers (builders, writers, constants) live in
tests/helpers.py; test files never import from each other."""
from pathlib import Path

import pytest
import torch

from helpers import RES, random_grey_shards, write_img2dataset


@pytest.fixture(scope="module")
def one_thread():
    """Run a whole test file with one torch thread, restoring the count afterwards.

    Toy networks gain nothing from a second thread, and on a busy 2-core machine spinning
    OpenMP threads make each step many times slower. Module scope, so a file opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")` and files that only use its shared
    fixtures (e.g. `pixel_shards`) keep their own thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Pixel training data (test_engine_trainer.py, test_engine_deepspeed_backend.py)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pixel_shards(tmp_path_factory) -> Path:
    """32 training + 8 held-out random 16x16 grey images, with their fixed noisy copies."""
    from ambient_dist.data import ShardOptions
    return random_grey_shards(tmp_path_factory.mktemp("data"), 40, 16,
                              ShardOptions(resolution=16, channels=1, sigma_tn=0.5, count=32, heldout=8,
                                           samples_per_shard=16))


# --------------------------------------------------------------------------------------------
# Text-conditional models and data (test_text_*.py)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A complete diffusers-format directory of tiny random SD components (v-prediction)."""
    from ambient_dist.text.sd_models import save_components, tiny_components
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    save_components(tiny_components(seed=0), path)
    return path


@pytest.fixture(scope="session")
def laion(tmp_path_factory) -> Path:
    return write_img2dataset(tmp_path_factory.mktemp("laion") / "img2dataset", n=12, per_shard=5)


@pytest.fixture(scope="module")
def latent_shards(tiny_model, laion, tmp_path_factory):
    """Latent shards with text embeddings, written by two ranks (rank 1 first)."""
    from ambient_dist.data.sources import open_source
    from ambient_dist.text.latents import LatentShardOptions, make_latent_shards
    from ambient_dist.text.sd_models import load_components
    out = tmp_path_factory.mktemp("latent") / "shards"
    components = load_components(tiny_model, ("vae", "text_encoder", "tokenizer"))
    opts = LatentShardOptions(resolution=RES, t_n=50, samples_per_shard=3, heldout=2, batch_size=2,
                              text_embeddings=True, noise_seed=7)
    source = open_source(str(laion), "webdataset")
    partial = make_latent_shards(source, out, opts, components, rank=1, world_size=2, progress=False)
    assert not partial["complete"] and not (out / "manifest.json").exists()
    manifest = make_latent_shards(source, out, opts, components, rank=0, world_size=2, progress=False)
    assert manifest["complete"]
    return out, components, opts
