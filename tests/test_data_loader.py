"""The three loaders (ambient_dist.data.loader and its resident, webdataset and DALI back ends):
identical batches, exact epochs, disjoint rank x worker splits, resume, and no draw from the
global RNGs. The sample order on its own: test_data_order.py."""
import random

import numpy as np
import pytest
import torch

from ambient_dist.config import ConfigError, load_config
from ambient_dist.data import ShardSet, build_loader
from ambient_dist.data.shards import ShardOptions, make_shards
from ambient_dist.data.sources import open_source
from helpers import global_random_states, random_images

N = 21  # not a multiple of any batch size below, nor of the shard size


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaders")
    np.savez(root / "src.npz", images=random_images(N, 16, 16, 3, seed=9), labels=np.arange(N) % 4)
    make_shards(open_source(str(root / "src.npz")), root / "shards",
                ShardOptions(resolution=16, sigma_tn=0.7, samples_per_shard=8), progress=False)
    return root / "shards"


def config(shard_dir, loader="resident", batch=6, **extra):
    overrides = [f"data.shards={shard_dir}", f"data.loader={loader}", "data.resolution=16",
                 "data.channels=3", "data.num_classes=4", "objective.sigma_tn=0.7",
                 "network.channel_mult=[1,2]", f"train.batch={batch}"]
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


def take(loader, steps):
    out = [next(loader) for _ in range(steps)]
    loader.close()
    return out


def assert_same(a, b):
    assert a.keys == b.keys
    assert torch.equal(a.clean, b.clean) and torch.equal(a.noisy, b.noisy)
    assert (a.labels is None and b.labels is None) or torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("loader,workers", [("webdataset", 0), ("webdataset", 2), ("dali", 1)])
def test_loaders_yield_identical_batches(shard_dir, loader, workers):
    steps = 8  # 48 samples: crosses two epoch boundaries of 21
    ref = take(build_loader(config(shard_dir), 0, 1, "cpu"), steps)
    got = take(build_loader(config(shard_dir, loader, **{"data.workers": workers}), 0, 1, "cpu"), steps)
    for a, b in zip(ref, got):
        assert_same(a, b)
    b = ref[0]
    assert b.clean.dtype == torch.float32 and b.clean.shape == (6, 3, 16, 16)
    assert b.clean.min() >= -1 and b.clean.max() <= 1 and b.labels.shape == (6, 4)


def test_batch_content_matches_shards_and_flips_travel_together(shard_dir):
    shards = ShardSet(shard_dir)
    loader = build_loader(config(shard_dir, batch=7), 0, 1, "cpu")
    flipped = unflipped = 0
    for batch in take(loader, 6):
        for j, key in enumerate(batch.keys):
            s = shards.sample(shards.keys.index(key))
            clean = torch.from_numpy(s.clean).float() / 127.5 - 1
            noisy = torch.from_numpy(s.noisy).float()
            if torch.equal(batch.clean[j], clean) and torch.equal(batch.noisy[j], noisy):
                unflipped += 1
            else:  # the same flip for the image and its noisy copy, never one without the other
                assert torch.equal(batch.clean[j], clean.flip(-1)) and torch.equal(batch.noisy[j], noisy.flip(-1))
                flipped += 1
            assert batch.labels[j].argmax() == s.label
    assert flipped > 5 and unflipped > 5
    no_flip = take(build_loader(config(shard_dir, **{"data.xflip": False}), 0, 1, "cpu"), 1)[0]
    for j, key in enumerate(no_flip.keys):
        assert torch.equal(no_flip.clean[j], torch.from_numpy(shards.sample(shards.keys.index(key)).clean).float() / 127.5 - 1)


@pytest.mark.parametrize("loader,workers", [("resident", 0), ("webdataset", 2)])
def test_ranks_and_workers_are_disjoint_and_complete(shard_dir, loader, workers):
    # 3 shards, 2 ranks x 2 workers: random access needs no shard per worker.
    world, batch = 2, 6
    steps = 7  # 7 steps x 6 = 42 = exactly two epochs of 21
    per_rank = [take(build_loader(config(shard_dir, loader, batch=batch, **{"data.workers": workers}),
                                  r, world, "cpu"), steps) for r in range(world)]
    stream = []
    for step in range(steps):
        a, b = per_rank[0][step].keys, per_rank[1][step].keys
        assert len(a) == len(b) == 3
        stream += a + b
    keys = ShardSet(shard_dir).keys
    for e in range(2):
        assert sorted(stream[e * N:(e + 1) * N]) == sorted(keys)  # each sample once per epoch
    single = take(build_loader(config(shard_dir, batch=batch), 0, 1, "cpu"), steps)
    assert stream == [k for b in single for k in b.keys]  # same global stream as one rank


@pytest.mark.parametrize("loader", ["resident", "webdataset", "dali"])
def test_resume_continues_the_exact_sequence(shard_dir, loader):
    cfg = config(shard_dir, loader, batch=4, **{"data.workers": 1})
    full = build_loader(cfg, 1, 2, "cpu")
    first = [next(full) for _ in range(5)]
    state = full.state_dict()
    assert state["samples_seen"] == 5 * 4
    rest = [next(full) for _ in range(4)]
    full.close()
    resumed = build_loader(cfg, 1, 2, "cpu", start_sample=state["samples_seen"])
    for a, b in zip(rest, take(resumed, 4)):
        assert_same(a, b)
    assert resumed.samples_seen == 9 * 4
    assert first[0].keys != rest[0].keys


LOADER_WORKERS = [("resident", 0), ("webdataset", 0), ("webdataset", 1), ("webdataset", 2),
                  ("dali", 0), ("dali", 2)]


@pytest.mark.parametrize("loader,workers", LOADER_WORKERS, ids=[f"{n}-{w}" for n, w in LOADER_WORKERS])
def test_no_loader_draws_from_the_global_random_states(shard_dir, loader, workers):
    # The trainer's global RNG (dropout) is saved with a checkpoint and restored on resume; a
    # loader that drew from it when started (torch's DataLoader does, by default, for its
    # workers' base seed) shifted every later draw of a resumed run.
    before = global_random_states()
    cfg = config(shard_dir, loader, **{"data.workers": workers})
    take(build_loader(cfg, 0, 1, "cpu"), 3)
    take(build_loader(cfg, 0, 1, "cpu", start_sample=12), 2)  # as a resumed run starts it
    assert global_random_states() == before


@pytest.mark.parametrize("loader,worker_counts", [("webdataset", (0, 1, 2)), ("dali", (1, 2))],
                         ids=["webdataset", "dali"])
def test_what_a_fetch_draws_depends_only_on_the_stream_position(shard_dir, monkeypatch, loader,
                                                                worker_counts):
    # A fetch that draws from the global RNGs (say an augmentation added to the worker's
    # decode) runs ahead of the step, in a worker process or a DALI prefetch: what it draws
    # must still be the same for every worker count and resume point, and leave the
    # caller's RNGs alone.
    plain = take(build_loader(config(shard_dir, loader), 0, 1, "cpu"), 6)
    decode_noisy = ShardSet.decode_noisy

    def drawing(self, i, data):
        drawn = torch.rand(()).item() + np.random.random() + random.random()
        # Small enough that the stored noise still has the manifest's sigma_tn (ShardSet
        # measures it when it opens the shards), large enough to survive float16 rounding.
        return decode_noisy(self, i, data) + np.float16(0.01 * drawn)
    monkeypatch.setattr(ShardSet, "decode_noisy", drawing)
    before = global_random_states()
    runs = {w: take(build_loader(config(shard_dir, loader, **{"data.workers": w}), 0, 1, "cpu"), 6)
            for w in worker_counts}
    resumed = take(build_loader(config(shard_dir, loader, **{"data.workers": worker_counts[-1]}),
                                0, 1, "cpu", start_sample=3 * 6), 3)
    assert global_random_states() == before
    ref = runs[worker_counts[0]]
    assert not any(torch.equal(a.noisy, b.noisy) for a, b in zip(plain, ref))  # the draws arrive
    for w in worker_counts[1:]:
        for a, b in zip(ref, runs[w]):
            assert_same(a, b)
    for a, b in zip(ref[3:], resumed):
        assert_same(a, b)


def test_subset_takes_a_prefix_and_mismatch_is_refused(shard_dir):
    loader = build_loader(config(shard_dir, **{"data.subset": 10}), 0, 1, "cpu")
    assert loader.num_samples == 10
    keys = {k for b in take(loader, 5) for k in b.keys}
    assert keys == set(ShardSet(shard_dir).keys[:10])
    with pytest.raises(ConfigError, match="objective.sigma_tn is 0.5"):
        build_loader(config(shard_dir, **{"objective.sigma_tn": 0.5}), 0, 1, "cpu")


def test_unconditional_has_no_labels(shard_dir):
    b = take(build_loader(config(shard_dir, **{"data.num_classes": 0}), 0, 1, "cpu"), 1)[0]
    assert b.labels is None


@pytest.mark.gpu
@pytest.mark.parametrize("loader", ["resident", "webdataset", "dali"])
def test_gpu_loaders_match_cpu(shard_dir, loader):
    ref = take(build_loader(config(shard_dir), 0, 1, "cpu"), 4)
    got = take(build_loader(config(shard_dir, loader, **{"data.workers": 2}), 0, 1, "cuda"), 4)
    for a, b in zip(ref, got):
        assert b.clean.is_cuda and b.noisy.is_cuda
        assert a.keys == b.keys
        assert torch.equal(a.clean, b.clean.cpu()) and torch.equal(a.noisy, b.noisy.cpu())
        assert torch.equal(a.labels, b.labels.cpu())
