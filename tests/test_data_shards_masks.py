"""The masking baseline's fixed inpainting masks: made once per key, stored in the shards,
identical in every loader and after resume, flipped with their image, checked against the config."""
import numpy as np
import pytest
import torch

from ambient_dist.config import ConfigError, load_config
from ambient_dist.data import ShardSet, build_loader
from ambient_dist.data.shards import ShardError, ShardOptions, make_shards, read_masks
from ambient_dist.data.sources import open_source
from ambient_dist.noise import keyed_mask
from helpers import random_images

N = 13


@pytest.fixture(scope="module")
def mask_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks")
    np.savez(root / "src.npz", images=random_images(N, 8, 8, 3, seed=4))
    opts = ShardOptions(resolution=8, sigma_tn=0.0, samples_per_shard=5, mask_corruption=0.4)
    make_shards(open_source(str(root / "src.npz")), root / "shards", opts, progress=False)
    return root / "shards"


def config(shards, loader="resident", **extra):
    overrides = [f"data.shards={shards}", f"data.loader={loader}", "data.resolution=8",
                 "data.channels=3", "objective.sigma_tn=0", "objective.method=masking",
                 "network.channel_mult=[1,2]", "train.batch=4"]
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


def test_masks_are_keyed_and_stored(mask_shards):
    shards = ShardSet(mask_shards)
    stored = read_masks(mask_shards, shards.keys)
    assert stored.dtype == bool and stored.shape == (N, 3, 8, 8)
    for i, key in enumerate(shards.keys):
        assert np.array_equal(stored[i], keyed_mask((3, 8, 8), 0, key, 0.4).numpy())
    # Keyed: a key's mask does not depend on which other keys exist or their order.
    assert torch.equal(keyed_mask((3, 8, 8), 0, "a", 0.4), keyed_mask((3, 8, 8), 0, "a", 0.4))
    assert not torch.equal(keyed_mask((3, 8, 8), 0, "a", 0.4), keyed_mask((3, 8, 8), 0, "b", 0.4))
    assert not torch.equal(keyed_mask((3, 8, 8), 0, "a", 0.4), keyed_mask((3, 8, 8), 1, "a", 0.4))
    big = keyed_mask((200_000,), 0, "x", 0.4)
    assert abs(big.float().mean().item() - 0.6) < 0.005
    manifest = shards.manifest["masks"]
    assert manifest["corruption"] == 0.4 and manifest["count"] == N
    with pytest.raises(ShardError, match="no mask for key 'nope'"):
        read_masks(mask_shards, ["nope"])


@pytest.mark.parametrize("loader,workers", [("webdataset", 0), ("webdataset", 2)])
def test_masks_identical_across_loaders_and_flipped_with_the_image(mask_shards, loader, workers):
    shards = ShardSet(mask_shards)
    stored = read_masks(mask_shards, shards.keys)
    ref_loader = build_loader(config(mask_shards), 0, 1, "cpu")
    other = build_loader(config(mask_shards, loader, **{"data.workers": workers}), 0, 1, "cpu")
    flipped = 0
    for _ in range(7):
        a, b = next(ref_loader), next(other)
        assert a.keys == b.keys and torch.equal(a.mask, b.mask) and torch.equal(a.clean, b.clean)
        for j, key in enumerate(a.keys):
            m = torch.from_numpy(stored[shards.keys.index(key)]).float()
            clean = torch.from_numpy(shards.sample(shards.keys.index(key)).clean).float() / 127.5 - 1
            if torch.equal(a.clean[j], clean):
                assert torch.equal(a.mask[j], m)
            else:   # the image was flipped: so is its mask
                assert torch.equal(a.clean[j], clean.flip(-1)) and torch.equal(a.mask[j], m.flip(-1))
                flipped += 1
    other.close()
    assert flipped > 3


def test_masks_after_resume_are_the_ones_an_uninterrupted_run_sees(mask_shards):
    cfg = config(mask_shards)
    full = build_loader(cfg, 0, 1, "cpu")
    batches = [next(full) for _ in range(6)]
    resumed = build_loader(cfg, 0, 1, "cpu", start_sample=3 * 4)
    for b in batches[3:]:
        r = next(resumed)
        assert r.keys == b.keys and torch.equal(r.mask, b.mask)


def test_plain_runs_get_no_mask_and_masking_needs_masked_shards(mask_shards, tmp_path):
    plain = config(mask_shards, **{"objective.method": "ambient"})
    assert next(build_loader(plain, 0, 1, "cpu")).mask is None
    np.savez(tmp_path / "src.npz", images=random_images(4, 8, 8, 3, seed=1))
    make_shards(open_source(str(tmp_path / "src.npz")), tmp_path / "plain",
                ShardOptions(resolution=8, sigma_tn=0.0), progress=False)
    with pytest.raises(ConfigError, match="no inpainting masks.*--mask-corruption 0.4"):
        build_loader(config(tmp_path / "plain"), 0, 1, "cpu")
    with pytest.raises(ConfigError, match="objective.mask_corruption is 0.3, the shards' masks erase 0.4"):
        build_loader(config(mask_shards, **{"objective.mask_corruption": 0.3}), 0, 1, "cpu")


def test_shards_without_masks_keep_their_plan(tmp_path):
    """Adding the option must not change the plan hash of shards made before it existed."""
    opts = ShardOptions(resolution=8, sigma_tn=0.5)
    assert "mask_corruption" not in opts.content()
    assert ShardOptions(resolution=8, mask_corruption=0.4).content()["mask_corruption"] == 0.4
