"""What the power-function EMA (ema.kind=power, EDM2's post-hoc EMA) costs: update, disk, fit.

    ema_update            ms per optimizer step of PowerEMA.update (two profiles, sigma_rel
                          0.05 and 0.10, as the config's default) on a DDPM++ network's
                          state; baseline: the classic EMA's update (one profile, EDM's
                          half-life) on the same tensors. Both are fp32 lerps over the model,
                          so the expected ratio is about 1 / len(sigma_rels).
    snapshot_size         MB of one snapshot on disk (every tracked profile, float32); baseline:
                          ema.safetensors of the same network (what a classic run keeps).
    snapshot_write        ms to write one snapshot (engine/power_ema.py's writer, atomic);
                          baseline: writing ema.safetensors once (the export every checkpoint does).
    reconstruct_3         s for ambient-posthoc-ema's library call (ambient_dist.posthoc_ema.
                          reconstruct) of three sigma_rels from `snapshots` snapshots; baseline:
                          reading those snapshot files once, every tensor converted to float64
                          and summed (the I/O and one pass: the floor of any fit).

Sizes: --quick a DDPM++ with 32 base channels at 32x32 and 8 snapshots; default the CIFAR-10
DDPM++ (128 channels, 56M parameters; 3.6 GB of temporary snapshots) and 8 snapshots.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.harness import Context, measure, median, result

from ambient_dist.config import load_config
from ambient_dist.distributed import DistInfo
from ambient_dist.engine.ema import EMA, ema_beta
from ambient_dist.engine.power_ema import PowerEMA
from ambient_dist.fileio import atomic_path
from ambient_dist.models import build_network
from ambient_dist.posthoc_ema import list_snapshots, rank_file, reconstruct


def _state(ctx: Context) -> dict[str, torch.Tensor]:
    channels = ctx.size(quick=32, default=128)
    cfg = load_config(None, [f"network.model_channels={channels}", "data.resolution=32"])
    torch.manual_seed(0)
    return {k: v.to(ctx.device) for k, v in build_network(cfg).state_dict().items()}


def run(ctx: Context) -> list[dict]:
    live = _state(ctx)
    params = sum(v.numel() for v in live.values() if v.is_floating_point())
    repeats = ctx.size(quick=5, default=10)
    batch = 256
    classic = EMA(live)
    power = PowerEMA(EMA(live), live, [0.05, 0.10])
    images = [batch]

    def power_step():
        images[0] += batch
        power.update(live, images[0], batch)

    beta = ema_beta(10**7, batch, 500, 0.05)
    classic_step = lambda: classic.update(live, beta)  # noqa: E731
    # Interleaved, one call of each per repeat: on a shared machine the load drifts within
    # seconds, and two back-to-back series would compare two different machines.
    for fn in (classic_step, power_step):
        measure(fn, repeats=1, warmup=1, device=ctx.device)
    classic_s, power_s = [], []
    for _ in range(repeats):
        classic_s += measure(classic_step, repeats=1, warmup=0, device=ctx.device)
        power_s += measure(power_step, repeats=1, warmup=0, device=ctx.device)
    out = [result("ema_update", "ms", 1e3 * median(power_s), 1e3 * median(classic_s),
                  "classic EMA update (one profile)", [1e3 * s for s in power_s],
                  [1e3 * s for s in classic_s], parameters=params, profiles=2,
                  ms_per_profile=1e3 * median(power_s) / 2)]
    ctx.save_partial(out)

    from safetensors.torch import load_file, save_file
    snapshots = ctx.size(quick=8, default=8)
    with tempfile.TemporaryDirectory(prefix="bench_ema_") as tmp:
        run_dir = Path(tmp)
        export = run_dir / "ema.safetensors"

        def write_export():
            with atomic_path(export) as t:
                save_file({k: v.cpu().contiguous() for k, v in classic.state_dict().items()}, str(t))

        steps = [0]

        def write_snapshot():
            steps[0] += 1
            power.save_snapshot(run_dir, steps[0] * batch, batch, DistInfo(), {}, "bench")

        export_s = measure(write_export, repeats=3, warmup=1)
        snap_s = measure(write_snapshot, repeats=snapshots - 1, warmup=1)
        snap_bytes = rank_file(list_snapshots(run_dir)[0].path, 0).stat().st_size
        out.append(result("snapshot_size", "MB", snap_bytes / 1e6, export.stat().st_size / 1e6,
                          "ema.safetensors (one float32 copy)", parameters=params, profiles=2,
                          bytes_per_parameter=snap_bytes / params))
        out.append(result("snapshot_write", "ms", 1e3 * median(snap_s), 1e3 * median(export_s),
                          "writing ema.safetensors once", [1e3 * s for s in snap_s],
                          [1e3 * s for s in export_s], parameters=params))
        ctx.save_partial(out)

        files = [rank_file(s.path, 0) for s in list_snapshots(run_dir)]
        def read_all():   # load and touch every tensor (load_file maps the file lazily)
            return sum(float(t.double().sum()) for f in files for t in load_file(str(f)).values())

        read_s, fit_s = [], []
        for _ in range(2):
            read_s += measure(read_all, repeats=1, warmup=0)
            fit_s += measure(lambda: reconstruct(run_dir, [0.05, 0.08, 0.12]), repeats=1, warmup=0)
        out.append(result("reconstruct_3", "s", median(fit_s), median(read_s),
                          "reading every snapshot tensor once (load, to float64, sum)", fit_s, read_s,
                          snapshots=len(files), sigma_rels=3, parameters=params))
    return out
