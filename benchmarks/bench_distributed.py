"""Distributed training: communication volume per step by ZeRO stage, and 2-rank overhead.

Scaling across nodes cannot be measured on one machine, so this module reports two things:

1. Analytic communication per optimizer step, for the DDPM++ CIFAR-10 network, the DDPM++
   FFHQ-64 network and the Stable Diffusion 2 U-Net, on a stated cluster (4 nodes x 8 GPUs,
   one 200 Gb/s link per node). Per ZeRO stage, with P parameters and N ranks:

       stage 0 (DDP)   all-reduce gradients                      2 (N-1)/N P g
       stage 1, 2      reduce-scatter gradients + all-gather     (N-1)/N P g + (N-1)/N P w
                       the updated (bf16) weights
       stage 3         all-gather weights for forward and again  (N-1)/N P g + 2 (N-1)/N P w
                       for backward, reduce-scatter gradients

   g = bytes per gradient element as communicated (fp32: our bf16 setting accumulates and
   reduces gradients in fp32), w = bytes per communicated weight (bf16). "ours" is the volume
   each GPU sends per step; the baseline is plain DDP (stage 0). The time estimate assumes
   hierarchical collectives (NVLink inside a node is ~20x faster than the node link, so it is
   neglected): each node's link carries the same formulas with N = number of nodes.
   Compute per step comes from /work/shared/spec/performance.md (GFLOP per image, the target
   images/s per GPU); for the SD U-Net, FLOPs are counted with torch.utils.flop_counter on the
   meta device and run at the same utilisation as the DDPM++ target. The figure to read is
   compute / communication: below 1 the step waits on the network unless the per-GPU batch
   grows (the `batch_to_hide_comm` field says how far).

2. Measured: one training step of a tiny DDPM++ under plain torch DDP with gloo on 127.0.0.1,
   2 ranks against 1 rank (same per-rank batch, one thread per rank; the 1-rank step is timed
   on rank 0 before the group forms, while rank 1 waits idle). ratio = t1 / t2 is the
   weak-scaling efficiency of the 2-rank step on this machine (on a GPU run it is still CPU).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import socket
from dataclasses import dataclass

import torch

from benchmarks.harness import REPO_ROOT, Context, median, result

# The cluster the estimate is for (stated in the issue).
NODES = 4
GPUS_PER_NODE = 8
NODE_LINK_BYTES_PER_S = 200e9 / 8     # 200 Gb/s per node, one direction
GRAD_BYTES = 4                        # gradients reduced in fp32 (fp32 accumulation)
WEIGHT_BYTES = 2                      # weights gathered in bf16

# Compute figures from the shared performance spec (training step, forward + backward).
DDPMPP_CIFAR_GFLOP_PER_IMG = 127.1
DDPMPP_FFHQ64_GFLOP_PER_IMG = 251.0
TARGET_IMG_PER_S_CIFAR = 3000.0       # per H200
TARGET_IMG_PER_S_FFHQ64 = 1500.0
H200_BF16_MATMUL_FLOPS = 750e12       # measured ceiling in the spec
# SD has no target in the spec: assume the DDPM++ target's utilisation of the matmul ceiling.
TARGET_MFU = TARGET_IMG_PER_S_CIFAR * DDPMPP_CIFAR_GFLOP_PER_IMG * 1e9 / H200_BF16_MATMUL_FLOPS

# The Stable Diffusion 2 U-Net (ambient_dist.text.sd_models.SD2_UNET_CONFIG) is built on the
# meta device to count parameters and FLOPs without weights.
SD2_LATENT = 64                       # 512x512 images (the paper's fine-tuning resolution)


@dataclass
class ModelLoad:
    """What the estimate needs to know about one model."""
    name: str
    params: int
    flops_per_img: float              # training step (forward + backward) per image
    img_per_s_per_gpu: float          # assumed compute speed
    global_batch: int
    source: str                       # where the figures came from


# --------------------------------------------------------------------------------------
# 1. Analytic communication volume
# --------------------------------------------------------------------------------------

def comm_bytes(params: int, ranks: int, stage: int) -> dict[str, float]:
    """Bytes each rank sends per step, by collective, for one ZeRO stage (module docstring)."""
    share = (ranks - 1) / ranks * params
    if stage == 0:
        return {"all_reduce": 2 * share * GRAD_BYTES, "reduce_scatter": 0.0, "all_gather": 0.0}
    if stage in (1, 2):
        return {"all_reduce": 0.0, "reduce_scatter": share * GRAD_BYTES,
                "all_gather": share * WEIGHT_BYTES}
    if stage == 3:
        return {"all_reduce": 0.0, "reduce_scatter": share * GRAD_BYTES,
                "all_gather": 2 * share * WEIGHT_BYTES}
    raise ValueError(f"comm_bytes: ZeRO stage must be 0..3, got {stage}")


def _from_config(path: str):
    from ambient_dist.config import load_config
    # The shipped config names its shard directory; the architecture is all we need here.
    return load_config(REPO_ROOT / path, ["data.shards="])


def _count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ddpmpp_load(name: str, config_path: str, gflop: float, img_per_s: float) -> ModelLoad:
    from ambient_dist.models import build_network
    cfg = _from_config(config_path)
    with torch.device("meta"):       # shapes only: no memory, no init time
        net = build_network(cfg)
    return ModelLoad(name, _count_params(net), gflop * 1e9, img_per_s, cfg.train.batch,
                     f"params from {config_path}; FLOPs and img/s from the performance spec")


def sd2_load(global_batch: int = 256) -> ModelLoad:
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from ambient_dist.text.sd_models import SD2_TEXT_TOKENS, SD2_UNET_CONFIG
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD2_UNET_CONFIG)
        latent = torch.zeros(1, 4, SD2_LATENT, SD2_LATENT)
        text = torch.zeros(1, SD2_TEXT_TOKENS, SD2_UNET_CONFIG["cross_attention_dim"])
        with FlopCounterMode(display=False) as counter:
            unet(latent, torch.zeros(1), encoder_hidden_states=text).sample.sum().backward()
    flops = float(counter.get_total_flops())
    return ModelLoad("sd2-unet", _count_params(unet), flops,
                     TARGET_MFU * H200_BF16_MATMUL_FLOPS / flops, global_batch,
                     f"params and FLOPs counted (512px, {SD2_TEXT_TOKENS} tokens); "
                     f"img/s at the DDPM++ target's {TARGET_MFU:.0%} of 750 TFLOP/s")


def stage_estimate(model: ModelLoad, stage: int) -> dict:
    """Per-step volume, time on the node link, compute time, and their ratio."""
    ranks = NODES * GPUS_PER_NODE
    per_gpu = comm_bytes(model.params, ranks, stage)
    per_node_link = sum(comm_bytes(model.params, NODES, stage).values())
    comm_s = per_node_link / NODE_LINK_BYTES_PER_S
    batch_per_gpu = model.global_batch // ranks
    compute_s = batch_per_gpu / model.img_per_s_per_gpu
    return {
        "bytes_per_gpu": per_gpu,
        "gb_per_gpu": sum(per_gpu.values()) / 1e9,
        "node_link_gb": per_node_link / 1e9,
        "comm_ms": comm_s * 1e3,
        "compute_ms": compute_s * 1e3,
        "compute_to_comm": compute_s / comm_s,
        "batch_per_gpu": batch_per_gpu,
        # Per-GPU batch (e.g. through gradient accumulation) at which compute covers comm.
        "batch_to_hide_comm": math.ceil(comm_s * model.img_per_s_per_gpu),
    }


def comm_results(models: list[ModelLoad]) -> list[dict]:
    out = []
    for model in models:
        ddp = stage_estimate(model, 0)
        for stage in (0, 1, 2, 3):
            est = stage_estimate(model, stage)
            out.append(result(
                f"comm/{model.name}/zero{stage}", "GB/step", est["gb_per_gpu"], ddp["gb_per_gpu"],
                "DDP all-reduce (fp32 grads)", higher_is_better=False,
                params=model.params, flops_per_img=model.flops_per_img,
                img_per_s_per_gpu=model.img_per_s_per_gpu, source=model.source,
                cluster=f"{NODES}x{GPUS_PER_NODE} GPUs, 200 Gb/s per node", **est,
                note=f"{model.params / 1e6:.0f}M params; compute/comm {est['compute_to_comm']:.2f} "
                     f"at {est['batch_per_gpu']} img/GPU (hidden from {est['batch_to_hide_comm']})"))
    return out


# --------------------------------------------------------------------------------------
# 2. Measured DDP/gloo overhead on this machine
# --------------------------------------------------------------------------------------

def _tiny_config():
    from ambient_dist.config import ExperimentConfig
    cfg = ExperimentConfig()
    cfg.data.resolution, cfg.data.channels = 16, 3
    cfg.network.model_channels, cfg.network.channel_mult = 16, [1, 2]
    cfg.network.num_blocks, cfg.network.attn_resolutions, cfg.network.dropout = 1, [8], 0.0
    return cfg


def _rank_main(rank: int, port: int, batch: int, steps: int, results) -> None:
    """One of two ranks. Rank 0 first times the plain 1-rank step (rank 1 meanwhile waits,
    idle, in the rendezvous), then both time the same step under DDP; rank 0 reports both."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from ambient_dist.models import build_network
    from benchmarks.harness import measure
    torch.set_num_threads(1)           # one core per rank, the same for the 1-rank baseline
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        torch.manual_seed(0)
        x0 = torch.randn(batch, 3, 16, 16)
        sigma = torch.rand(batch) + 0.1

        def timed_steps(net: torch.nn.Module) -> list[float]:
            opt = torch.optim.Adam(net.parameters(), lr=1e-4)

            def step():
                # A plain denoising loss: what is measured is the gradient all-reduce around it.
                noisy = x0 + sigma[:, None, None, None] * torch.randn_like(x0)
                loss = ((net(noisy, sigma) - x0) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return measure(step, repeats=steps, warmup=2)

        single = timed_steps(build_network(_tiny_config())) if rank == 0 else None
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=2)
        net = DistributedDataParallel(build_network(_tiny_config()))
        dist.barrier()
        double = timed_steps(net)
        if rank == 0:
            results.put(("ok", (single, double)))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        results.put(("error", f"rank {rank}: {type(e).__name__}: {e}"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_one_and_two_ranks(batch: int, steps: int, timeout_s: float = 600.0):
    """Seconds per step (one entry per step) of the plain 1-rank step and of the 2-rank
    DDP step, both on rank 0. Two processes, one thread each."""
    spawn = mp.get_context("spawn")   # fresh interpreters: no forked torch thread pools
    results = spawn.Queue()
    port = _free_port()
    procs = [spawn.Process(target=_rank_main, args=(r, port, batch, steps, results))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        status, payload = results.get(timeout=timeout_s)
    except queue.Empty:
        status, payload = "error", f"no result from the ranks within {timeout_s:g} s"
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
            p.join()
    if status != "ok":
        raise RuntimeError(f"DDP gloo benchmark: {payload}")
    return payload


def overhead_result(ctx: Context) -> dict:
    batch = ctx.size(quick=4, default=8)
    steps = ctx.size(quick=5, default=10)
    one, two = time_one_and_two_ranks(batch, steps)
    ms = lambda ts: [t * 1e3 for t in ts]  # noqa: E731
    return result("ddp-gloo/2-ranks-vs-1", "ms/step", median(ms(two)), median(ms(one)),
                  "1 rank, no DDP", ms(two), ms(one), batch_per_rank=batch,
                  threads_per_rank=1, backend="gloo on 127.0.0.1", model="DDPM++ 16 ch, 16x16",
                  note="ratio = weak-scaling efficiency of the 2-rank step (CPU)")


def run(ctx: Context) -> list[dict]:
    models = [
        ddpmpp_load("ddpmpp-cifar32", "configs/cifar10-ddpmpp.yaml",
                    DDPMPP_CIFAR_GFLOP_PER_IMG, TARGET_IMG_PER_S_CIFAR),
        ddpmpp_load("ddpmpp-ffhq64", "configs/ffhq64-ddpmpp.yaml",
                    DDPMPP_FFHQ64_GFLOP_PER_IMG, TARGET_IMG_PER_S_FFHQ64),
        sd2_load(),
    ]
    return comm_results(models) + [overhead_result(ctx)]
