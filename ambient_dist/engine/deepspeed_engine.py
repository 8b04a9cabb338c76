"""The training loop on DeepSpeed: ZeRO 1/2/3, bf16, gradient accumulation, clipping.

`DeepSpeedTrainer` is the `Trainer` with DeepSpeed doing the model/optimizer part (selected
by `distributed.engine: deepspeed`); the loop, data order, logging and EMA semantics are
the same code. What changes:

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
- EMA: under ZeRO-3 each rank averages only its own partition of every parameter
  (`param.ds_tensor`), so no step gathers the model; the partitions are gathered only to
  export ema.safetensors or to sample. Under ZeRO 0-2 every rank holds the full weights and
  averages them. With bf16 the live weights DeepSpeed exposes are the bf16 copies; the EMA
  averages those in fp32 (the fp32 masters are flattened inside the optimizer).
- Checkpoints: every rank writes into one staging directory -- DeepSpeed's own checkpoint
  (tag subdirectory `deepspeed`, DeepSpeed's `latest` file naming it, and its zero_to_fp32.py,
  so `python ckpt-N/zero_to_fp32.py ckpt-N OUT` works as DeepSpeed documents it) plus
  `rank<r>.safetensors` with that rank's EMA (partition) and RNG states -- and rank 0 writes
  meta.json and publishes it (rename, then checkpoints/latest) after a barrier. Resume needs
  the same world size.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from ambient_dist.config import ConfigError, ExperimentConfig
from ambient_dist.engine.checkpoint import save_tensors
from ambient_dist.engine.distributed import barrier
from ambient_dist.engine.trainer import Trainer, build_optimizer

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


class DeepSpeedTrainer(Trainer):
    # -- hooks --------------------------------------------------------------------------
    def _setup_model(self, net: torch.nn.Module) -> None:
        import deepspeed
        self._state_keys = list(net.state_dict().keys())
        ds_config = deepspeed_config(self.cfg, self.world_size)
        client_optimizer = (None if "optimizer" in ds_config else
                            build_optimizer(net.parameters(), self.cfg, self.device))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=net, optimizer=client_optimizer, model_parameters=net.parameters(),
            config=ds_config)
        self.net = self.engine.module
        self.zero3 = self.engine.zero_optimization_stage() == 3
        # A user JSON may turn bf16 on by itself; the weights are then bf16 and the forward
        # pass must run under bf16 autocast whatever train.precision says.
        self.bf16 = self.engine.bfloat16_enabled()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _ema_live(self) -> dict[str, torch.Tensor]:
        if not self.zero3:
            return self.net.state_dict()
        # This rank's partition of every parameter: flat, the same size on every rank.
        live = {name: p.ds_tensor for name, p in self.net.named_parameters()}
        buffers = dict(self.net.named_buffers())
        live.update({k: buffers[k] for k in self._state_keys if k not in live})
        return live

    def _backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
        self.engine.step()          # applies the update only at the accumulation boundary

    def _apply_step(self, step_loss: torch.Tensor) -> tuple[bool, torch.Tensor]:
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)
        return bool(self.engine.was_step_applied()), norm

    # -- EMA of the whole model -------------------------------------------------------------
    def ema_state_full(self) -> dict[str, torch.Tensor]:
        """Gather the EMA partitions (collective on all ranks under ZeRO-3)."""
        shadow = self.ema.state_dict()
        if not self.zero3:
            return shadow
        params = dict(self.net.named_parameters())
        full = {}
        for name in self._state_keys:
            if name not in params:
                full[name] = shadow[name]
                continue
            part = shadow[name].to(self.device)
            pieces = [torch.empty_like(part) for _ in range(self.world_size)]
            dist.all_gather(pieces, part)
            p = params[name]
            full[name] = torch.cat(pieces)[: p.ds_numel].view(p.ds_shape).cpu()
        return full

    # -- checkpoints ------------------------------------------------------------------------
    def _rank_file(self, directory: Path) -> Path:
        return directory / f"rank{self.rank:05d}.safetensors"

    def _write_checkpoint(self) -> Path:
        if self.rank == 0:
            self.checkpoints.stage(self.images_seen)
        barrier(self.dist)
        tmp = self.checkpoints.staging_path(self.images_seen)
        # save_latest: DeepSpeed's zero_to_fp32 finds the tag through a `latest` file in the
        # directory it is given; without one it demands --tag. The file lands in the staging
        # directory, so it is published atomically with the rest; our own resume passes the
        # tag explicitly and our checkpoints/latest (one level up) is a different file.
        self.engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=True)
        save_tensors({**{f"ema.{k}": v for k, v in self.ema.state_dict().items()},
                      **{f"rng.{k}": v for k, v in self._rng_states().items()}},
                     self._rank_file(tmp))
        barrier(self.dist)
        if self.rank == 0:
            torch.save({"loader": self.loader.state_dict()}, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps(self._meta(), indent=2, sort_keys=True))
            self.checkpoints.publish(self.images_seen)
        barrier(self.dist)
        return self.checkpoints.root / self.checkpoints.name(self.images_seen)

    def _restore(self, path: Path) -> None:
        meta = json.loads((path / "meta.json").read_text())
        self._check_resumable(meta, path)
        if not (path / DS_TAG).is_dir():
            raise ConfigError(f"checkpoint {path} was written by the plain engine, not DeepSpeed; "
                              "resume it with distributed.engine=none")
        load_path, _ = self.engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"checkpoint {path}: DeepSpeed could not load tag {DS_TAG!r}")
        mine = load_file(str(self._rank_file(path)), device=str(self.device))
        self.ema.load_state_dict({k[4:]: v for k, v in mine.items() if k.startswith("ema.")})
        self._set_rng_states({k[4:]: v.cpu() for k, v in mine.items() if k.startswith("rng.")})
        self._set_progress(meta)
        self._saved_loader_state = torch.load(path / "state.pt", map_location="cpu",
                                              weights_only=True).get("loader")
