"""Training data: sources -> shards with one fixed noisy copy per image -> loaders.

    sources   readers for image folders, CIFAR batches, MNIST idx, .npz, img2dataset shards;
              geometry (crop / pad) and the seeded subset choice
    shards    the shard format: writer (make_shards), manifest, reader (ShardSet),
              load_images(shards_dir, split) and check_manifest(manifest, cfg)
    order     the data order shared by all loaders: a pure function of (seed, epoch)
    augment   uint8 -> [-1, 1] conversion and the flip applied to clean and noisy alike
    loader    Batch, the loader base classes with their resume counter
    resident / webdataset_loader / dali_loader   the three ways of fetching the same batches
    build     build_loader(cfg, rank, world_size, device): the one cfg.data.loader names
"""
from .build import build_loader
from .loader import Batch, TrainLoader
from .shards import (ShardError, ShardOptions, ShardSet, check_manifest, load_images, load_model_images,
                     load_pixel_images, make_shards, read_manifest)
from .sources import SourceError, open_source

__all__ = ["Batch", "TrainLoader", "build_loader", "ShardError", "ShardOptions", "ShardSet",
           "check_manifest", "load_images", "load_model_images", "load_pixel_images", "make_shards",
           "read_manifest", "SourceError", "open_source"]
