"""The DeepSpeed backend: ZeRO 1/2/3, bf16 master weights, gradient accumulation, clipping.

`DeepSpeedBackend` is how a step runs when `distributed.engine: deepspeed` (engine/backend.py
has the protocol); the Trainer's loop, data order, logging and EMA semantics are the same
code as with the plain backend. What changes:

- `deepspeed_config(cfg, world_size)` derives DeepSpeed's JSON from our config: global batch,
  per-rank micro-batch and accumulation steps (validated to divide evenly), clipping, bf16
  (DeepSpeed then keeps fp32 master weights and accumulates gradients in fp32 -- which it
  does only inside a ZeRO optimizer, so config validation refuses bf16 at ZeRO stage 0), ZeRO stage.
  A user JSON (`distributed.deepspeed_config`, e.g. configs/deepspeed/zero3.json) replaces
  ours, except that its batch sizes must agree with the config.
- The optimizer is torch's Adam/AdamW built from `optimizer.*` (fused on CUDA), handed to
  DeepSpeed as a client optimizer; the learning-rate ramp sets its groups' rate each step.
- A non-finite gradient is detected by DeepSpeed's overflow check (all ranks agree) and the
  step is skipped; the trainer counts it like the plain path does.
- EMA: at ZeRO stages 1-3 the optimizer keeps the fp32 master weights flattened and split
  over the ranks; each rank's EMA averages its own slice of the masters (DeepSpeed's fragment
  mapping: `param._hp_mapping` at stages 1-2, `safe_get_local_fp32_param` at stage 3), so no
  step gathers the model and, under bf16, the average is of the fp32 weights the optimizer
  updates, not of their bf16 working copies (whose rounding would bias a slow average). The
  slices are assembled (one all-reduce of the flat model) only to export or to sample. At
  stage 0 (fp32 only) every rank holds the whole fp32 model and averages it.
- Checkpoints: every rank writes into one staging directory -- DeepSpeed's own checkpoint
  (tag subdirectory `deepspeed`, DeepSpeed's `latest` file naming it, and its zero_to_fp32.py,
  so `python ckpt-N/zero_to_fp32.py ckpt-N OUT` works as DeepSpeed documents it) plus
  `rank<r>.safetensors` with that rank's EMA (partition) and RNG states -- and rank 0 writes
  meta.json and publishes it (rename, then checkpoints/latest) after a barrier. Resume needs
  the same world size.
"""
from __future__ import annotations

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ambient_dist.config import ConfigError, ExperimentConfig
from ambient_dist.distributed import DistInfo, barrier, sum_over_ranks
from ambient_dist.engine.backend import TrainingState, build_optimizer
from ambient_dist.engine.checkpoint import CheckpointManager, save_tensors

DS_TAG = "deepspeed"
# Printing DeepSpeed's own per-step line is our logger's job.
_QUIET = {"steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def deepspeed_config(cfg: ExperimentConfig, world_size: int) -> dict:
    micro, accumulation = cfg.micro_batch(world_size), cfg.accumulation_steps(world_size)
    batch_keys = {"train_batch_size": cfg.train.batch, "train_micro_batch_size_per_gpu": micro,
                  "gradient_accumulation_steps": accumulation}
    path = cfg.distributed.deepspeed_config
    if path:
        try:
            user = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"distributed.deepspeed_config: cannot read {path}: {e}") from None
        for key, ours in batch_keys.items():
            if key in user and user[key] not in ("auto", ours):
                raise ConfigError(f"distributed.deepspeed_config: {path} sets {key} = {user[key]}, "
                                  f"but train.batch {cfg.train.batch} over {world_size} ranks needs "
                                  f"{ours}; remove the key or set it to \"auto\"")
        return {**_QUIET, "zero_allow_untested_optimizer": True, **user, **batch_keys}
    return {
        **batch_keys, **_QUIET,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "bf16": {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": True},
        # fp32 gradient accumulation across micro-batches, also under bf16. DeepSpeed honours
        # it with bf16 only at ZeRO stages 1-3 (stage 0 raises), hence validate()'s refusal.
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        # Our optimizer is torch's Adam/AdamW, which DeepSpeed calls "untested" for ZeRO.
        "zero_allow_untested_optimizer": True,
    }


@dataclass(frozen=True)
class _Slice:
    """Where this rank's EMA tensor of one parameter sits in the whole parameter."""
    shape: torch.Size   # the parameter's full shape
    start: int          # first element (of the flattened parameter) this rank holds
    numel: int          # how many (0 if none at ZeRO 1-2; a ZeRO-3 partition may be padded)


class DeepSpeedBackend:
    """DeepSpeed's engine behind the Backend protocol (engine/backend.py)."""

    def __init__(self, cfg: ExperimentConfig, dist_info: DistInfo):
        self.cfg, self.dist = cfg, dist_info
        self.device, self.rank, self.world_size = dist_info.device, dist_info.rank, dist_info.world_size

    def setup(self, net: torch.nn.Module) -> None:
        import deepspeed
        self._state_keys = list(net.state_dict().keys())
        ds_config = deepspeed_config(self.cfg, self.world_size)
        client_optimizer = (None if "optimizer" in ds_config else
                            build_optimizer(net.parameters(), self.cfg, self.device))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=net, optimizer=client_optimizer, model_parameters=net.parameters(),
            config=ds_config)
        self.module = self.engine.module
        self.stage = self.engine.zero_optimization_stage()
        # A user JSON may turn bf16 on by itself; the weights are then bf16 and the forward
        # pass must run under bf16 autocast whatever train.precision says.
        self.bf16 = self.engine.bfloat16_enabled()
        self._slices = self._master_slices()

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # -- the step -----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed counts micro-batches in step(); before the boundary it applies nothing.
            self.engine.step()

    def step(self, step_loss: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """The accumulation boundary: clip, check overflow on all ranks, update."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)
        return bool(self.engine.was_step_applied()), norm

    # -- EMA: this rank's slice of the fp32 master weights -------------------------------
    def _master_slices(self) -> dict[str, _Slice]:
        if self.stage == 0:
            return {}
        slices = {}
        for name, p in self.module.named_parameters():
            if self.stage == 3:
                part = p.ds_tensor.numel()  # the same on every rank (the last one padded)
                slices[name] = _Slice(p.ds_shape, self.rank * part, part)
            else:
                mapping = getattr(p, "_hp_mapping", None)  # None: not in this rank's partition
                address = mapping.lp_fragment_address if mapping is not None else None
                slices[name] = _Slice(p.shape, address.start if address else 0,
                                      address.numel if address else 0)
        return slices

    def _local_master(self, name: str, p: torch.nn.Parameter) -> torch.Tensor:
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param
            return safe_get_local_fp32_param(p)
        mapping = getattr(p, "_hp_mapping", None)
        return mapping.hp_fragment if mapping is not None else torch.empty(0, device=self.device)

    def ema_weights(self) -> dict[str, torch.Tensor]:
        """fp32 master slices of the parameters (flat) and the buffers (whole, the same on
        every rank) at ZeRO 1-3; the whole fp32 model at stage 0."""
        if not self._slices:
            return self.module.state_dict()
        live = {name: self._local_master(name, p) for name, p in self.module.named_parameters()}
        buffers = dict(self.module.named_buffers())
        live.update({k: buffers[k] for k in self._state_keys if k not in live})
        return live

    def full_weights(self, ema_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole model from every rank's slices (a collective: all ranks call it)."""
        if not self._slices:
            return ema_state
        names = [k for k in self._state_keys if k in self._slices]
        sizes = [self._slices[k].shape.numel() for k in names]
        flat = torch.zeros(sum(sizes), dtype=torch.float32, device=self.device)
        offset = 0
        for name, size in zip(names, sizes):
            s = self._slices[name]
            n = max(0, min(s.numel, size - s.start))  # drop ZeRO-3's padding
            if n:
                flat[offset + s.start: offset + s.start + n] = ema_state[name].reshape(-1)[:n]
            offset += size
        # The slices are disjoint and cover every element once: their sum is the model.
        flat = sum_over_ranks(flat)
        full, pieces = {}, iter(flat.split(sizes))
        for name in self._state_keys:
            full[name] = (next(pieces).view(self._slices[name].shape).cpu() if name in self._slices
                          else ema_state[name])
        return full

    def ema_layout(self) -> dict[str, tuple]:
        """{name: (full shape, start, numel)} of this rank's slices (the power-EMA snapshots
        record it, to assemble the slices offline); empty at stage 0 (whole tensors)."""
        return {k: (tuple(s.shape), s.start, s.numel) for k, s in self._slices.items()}

    def _ema_from_full(self, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint of the previous format (ZeRO 1-2: every rank averaged the whole bf16/fp32
        model) -> this rank's slices of it, so such checkpoints still resume."""
        out = dict(saved)
        for name, s in self._slices.items():
            t = saved[name]
            if t.shape == s.shape and self.stage != 3:
                out[name] = t.reshape(-1)[s.start: s.start + s.numel].clone()
        return out

    # -- checkpoints ----------------------------------------------------------------------
    def _rank_file(self, directory: Path) -> Path:
        return directory / f"rank{self.rank:05d}.safetensors"

    def save(self, checkpoints: CheckpointManager, images_seen: int, state: TrainingState) -> Path:
        """Every rank writes into one staging directory, rank 0 publishes it (see the module
        docstring); a collective."""
        if self.rank == 0:
            checkpoints.stage(images_seen)
        barrier(self.dist)
        tmp = checkpoints.staging_path(images_seen)
        # save_latest: DeepSpeed's zero_to_fp32 finds the tag through a `latest` file in the
        # directory it is given; without one it demands --tag. The file lands in the staging
        # directory, so it is published atomically with the rest; our own resume passes the
        # tag explicitly and our checkpoints/latest (one level up) is a different file.
        self.engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=True)
        save_tensors({**{f"ema.{k}": v for k, v in state.ema.items()},
                      **{f"rng.{k}": v for k, v in state.rng.items()},
                      **{f"power_ema.{k}": v for k, v in state.power_ema.items()}},
                     self._rank_file(tmp))
        barrier(self.dist)
        if self.rank == 0:
            torch.save({"loader": state.loader}, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps(state.meta, indent=2, sort_keys=True))
            checkpoints.publish(images_seen)
        barrier(self.dist)
        return checkpoints.root / checkpoints.name(images_seen)

    def load(self, path: Path) -> TrainingState:
        if not (path / DS_TAG).is_dir():
            raise ConfigError(f"checkpoint {path} was written by the plain engine, not DeepSpeed; "
                              "resume it with distributed.engine=none")
        load_path, _ = self.engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"checkpoint {path}: DeepSpeed could not load tag {DS_TAG!r}")
        mine = load_file(str(self._rank_file(path)), device=str(self.device))
        ema = self._ema_from_full({k[4:]: v for k, v in mine.items() if k.startswith("ema.")})
        rng = {k[4:]: v.cpu() for k, v in mine.items() if k.startswith("rng.")}
        power_ema = {k[len("power_ema."):]: v for k, v in mine.items() if k.startswith("power_ema.")}
        loader = torch.load(path / "state.pt", map_location="cpu", weights_only=True).get("loader")
        meta = json.loads((path / "meta.json").read_text())
        return TrainingState(ema=ema, rng=rng, loader=loader, meta=meta, power_ema=power_ema)
