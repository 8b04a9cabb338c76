"""The DALI loader: NVIDIA DALI decodes, flips and normalises, on the GPU when there is one.

Decoding uses `fn.decoders.image(device="mixed")` on a GPU (nvImageCodec; for PNG the entropy
decode stays on the host and the rest runs on the device) and `device="cpu"` with
`device_id=None` on machines without one. Flip and the uint8 -> [-1, 1] conversion run inside
the pipeline, on the clean image and the noisy copy alike.

The bytes come in through `fn.external_source`, read by random access through each tar's DALI
index, rather than through `fn.readers.webdataset`: that reader visits samples in stored order
(with at most a shuffle buffer), which cannot reproduce the global per-epoch permutation that
the other loaders use, nor start at an arbitrary sample count. Feeding the sample bytes keeps
the order a pure function of (seed, epoch), identical across the three loaders; reading them is
a memory-mapped slice, so the pipeline's decode remains the only real work.
"""
from __future__ import annotations

import numpy as np
import torch

from .augment import UNIT_TABLE
from .loader import Batch, TrainLoader
from .order import RankPlan, SampleOrder, position_random_state
from .shards import ShardSet


class BatchFeeder:
    """external_source callback: encoded PNGs, noisy copies and flip bits of pipeline
    iteration `n`, which is this rank's step n. DALI calls ahead (prefetch), so the fetch runs
    inside `order.position_random_state`: anything it might draw depends on the position it
    fetches, not on when it ran, and the trainer's global RNG is left as it was."""

    def __init__(self, shards: ShardSet, order: SampleOrder, plan: RankPlan):
        self.shards, self.order, self.plan = shards, order, plan

    def __call__(self, info):
        start = self.plan.step_start(info.iteration)
        with position_random_state(self.order.seed, start):
            indices, flips = self.order.positions(start, self.plan.micro_batch)
            pngs, noisy = [], []
            for i in indices:
                png, npy, _ = self.shards.raw(int(i))
                pngs.append(np.frombuffer(png, dtype=np.uint8))
                noisy.append(self.shards.decode_noisy(int(i), npy))
        return pngs, noisy, [np.array(f, dtype=np.int32) for f in flips]


def build_pipeline(feeder: BatchFeeder, batch_size: int, channels: int, device: torch.device,
                   threads: int):
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    on_gpu = device.type == "cuda"
    # No random operator here: DALI's own RNG is not saved with a checkpoint, so one would
    # make resume inexact. The flips come from the order's bits, fed with the bytes.
    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, threads),
                    device_id=(device.index or 0) if on_gpu else None, prefetch_queue_depth=2)
    with pipe:
        png, noisy, flip = fn.external_source(
            source=feeder, num_outputs=3, batch=True, batch_info=True,
            dtype=[types.UINT8, types.FLOAT16, types.INT32], layout=["", "CHW", ""])
        image = fn.decoders.image(png, device="mixed" if on_gpu else "cpu",
                                  output_type=types.GRAY if channels == 1 else types.RGB)
        image = fn.transpose(fn.flip(image, horizontal=flip), perm=[2, 0, 1], output_layout="CHW")
        # The same table as augment.to_model_units, so the bits match the other loaders.
        clean = fn.lookup_table(image, keys=list(range(256)), values=UNIT_TABLE.tolist(),
                                dtype=types.FLOAT)
        noisy = noisy.gpu() if on_gpu else noisy
        # Widen first (exact): DALI's CPU flip has no float16 kernel.
        noisy = fn.flip(fn.cast(noisy, dtype=types.FLOAT), horizontal=flip)
        pipe.set_outputs(clean, noisy)
    pipe.build()
    return pipe


def to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    dense = tensor_list.as_tensor()
    if device.type != "cuda":
        return torch.from_numpy(np.array(dense))
    from nvidia.dali.plugin.pytorch import feed_ndarray
    out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
    return out


class DaliLoader(TrainLoader):
    name = "dali"

    def __init__(self, cfg, rank, world_size, device, start_sample=0, shards=None):
        super().__init__(cfg, rank, world_size, device, start_sample, shards)
        feeder = BatchFeeder(self.shards, self.order, self.plan)
        self.pipe = build_pipeline(feeder, self.plan.micro_batch, self.shards.manifest["channels"],
                                   self.device, cfg.data.workers)

    def _next_batch(self, step: int) -> Batch:
        clean, noisy = self.pipe.run()
        indices, _ = self.step_samples(step)
        keys = [self.shards.keys[i] for i in indices]
        labels = None
        if self.num_classes:
            labels = self.one_hot(np.array([self.shards.label(int(i)) for i in indices]), keys)
        return Batch(keys, to_torch(clean, self.device), to_torch(noisy, self.device), labels)

    def close(self) -> None:
        self.pipe = None
