"""How a training step runs: the Backend the Trainer is given (the Task says what is trained).

A backend owns the trained module, its optimizer and the checkpoint format. Per optimizer
step the Trainer calls, in this order:

    with backend.autocast():  loss = ...          (once per micro-batch, the loss of the module)
    backend.backward(loss)                        (once per micro-batch; loss = micro-batch mean)
    applied, grad_norm = backend.step(step_loss)  (once per step: clip, skip if not finite, update)
    ema.update(backend.ema_weights(), beta)       (if applied)

`PlainBackend` (here) is single-process PyTorch; `DeepSpeedBackend` (deepspeed_backend.py) is
ZeRO 1/2/3 with bf16 master weights. A new way to run a step (FSDP2, say) is one more class
with these methods, chosen in engine/run.py.
"""
from __future__ import annotations

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import torch

from ambient_dist.config import ConfigError, ExperimentConfig
from ambient_dist.engine.checkpoint import Checkpoint, CheckpointManager


@dataclass
class TrainingState:
    """What the Trainer itself checkpoints, besides the backend's model and optimizer."""
    ema: dict[str, torch.Tensor]     # the EMA as `Backend.ema_weights` lays it out (float32)
    rng: dict[str, torch.Tensor]     # RNG states (uint8 tensors)
    loader: Optional[dict]           # the loader position and the data it was on
    meta: dict                       # images seen, steps, world size, config (meta.json)
    # ema.kind=power: the profiles after the first (PowerEMA.state_dict; the first is `ema`)
    power_ema: dict[str, torch.Tensor] = field(default_factory=dict)


def read_meta(path: Path) -> dict:
    """meta.json of a checkpoint directory (every format has one)."""
    try:
        return json.loads((Path(path) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint {path}: cannot read meta.json ({e}); pick another checkpoint "
                          "with --resume RUN_DIR/checkpoints/ckpt-N") from None


class Backend(Protocol):
    """How a step runs (the order of the calls: module docstring)."""

    module: torch.nn.Module                 # what the loss calls (DeepSpeed: engine.module)
    optimizer: torch.optim.Optimizer        # its param_groups take the learning rate

    def setup(self, net: torch.nn.Module) -> None: ...
    def autocast(self) -> AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, step_loss: torch.Tensor) -> tuple[bool, torch.Tensor]: ...
    def ema_weights(self) -> dict[str, torch.Tensor]: ...
    def full_weights(self, ema_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def ema_layout(self) -> dict[str, tuple]: ...
    def save(self, checkpoints: CheckpointManager, images_seen: int, state: TrainingState) -> Path: ...
    def load(self, path: Path) -> TrainingState: ...


def build_optimizer(params, cfg: ExperimentConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch's Adam / AdamW from `optimizer.*` (fused kernels on CUDA)."""
    o = cfg.optimizer
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
               fused=device.type == "cuda")


class PlainBackend:
    """Single-process PyTorch: fp32 weights, bf16 autocast if train.precision = bf16, the
    loss divided by the accumulation steps, global-norm clipping, a step skipped (not taken)
    when the loss or gradient is not finite."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device, accumulation: int):
        self.cfg, self.device, self.accumulation = cfg, device, accumulation

    def setup(self, net: torch.nn.Module) -> None:
        self.module = net
        self.optimizer = build_optimizer(net.parameters(), self.cfg, self.device)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.train.precision == "bf16")

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self, step_loss: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """Clip and step unless the loss or gradient is not finite -> (applied, grad norm)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # One host sync per step: a non-finite loss or gradient skips the update entirely.
        finite = bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm))
        if finite:
            if self.cfg.optimizer.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optimizer.grad_clip, grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite, grad_norm

    def ema_weights(self) -> dict[str, torch.Tensor]:
        """The live weights the EMA follows: the whole model (fp32 here)."""
        return self.module.state_dict()

    def full_weights(self, ema_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return ema_state  # already the whole model under the network's own keys

    def ema_layout(self) -> dict[str, tuple]:
        """Where each sliced EMA tensor sits in the whole one: none are sliced here."""
        return {}

    def save(self, checkpoints: CheckpointManager, images_seen: int, state: TrainingState) -> Path:
        extra = {"power_ema": state.power_ema} if state.power_ema else {}
        ckpt = Checkpoint(model=self.module.state_dict(), ema=state.ema, rng=state.rng,
                          state={"optimizer": self.optimizer.state_dict(), "loader": state.loader,
                                 **extra},
                          meta=state.meta)
        return checkpoints.save(ckpt, images_seen)

    def load(self, path: Path) -> TrainingState:
        if (Path(path) / "deepspeed").is_dir():
            raise ConfigError(f"checkpoint {path} was written by DeepSpeed; resume it with "
                              "distributed.engine=deepspeed at the same world size")
        ckpt = CheckpointManager.load(path, self.device)
        self.module.load_state_dict(ckpt.model)
        self.optimizer.load_state_dict(ckpt.state["optimizer"])
        return TrainingState(ema=ckpt.ema, rng=ckpt.rng, loader=ckpt.state.get("loader"),
                             meta=ckpt.meta, power_ema=ckpt.state.get("power_ema", {}))
