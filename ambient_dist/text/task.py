"""The text task: ambient fine-tuning of Stable Diffusion's U-Net on latent shards.

`TextTask` is what engine/run.py gives the engine's one Trainer when `task: text` (configs with
text.model_path set resolve to it). It differs from the image task in what is trained, not in
how a step runs, so plain PyTorch and DeepSpeed ZeRO 1/2/3 + bf16 both work unchanged:

- the network is the checkpoint's UNet2DConditionModel (trained; gradient checkpointing
  optional); the VAE and CLIP text encoder are frozen and never enter the optimizer, the EMA
  or the checkpoints;
- batches come from latent shards (text.latents.LatentLoader) with the text embedding in
  `Batch.cond` (stored in the shards, or encoded here from the captions);
- the loss is text.loss.TextAmbientLoss (caption dropout, text-embedding noise, the
  prediction-magnitude filter around the latent ambient loss);
- samples use classifier-free guidance from the training captions (text.sampling), and the end
  of the run also writes <run>/diffusers, the EMA U-Net as a diffusers model (text.export).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ambient_dist.config import ConfigError, ExperimentConfig
from ambient_dist.data.loader import Batch
from ambient_dist.data.shards import ShardError
from ambient_dist.engine.task import shard_reference_images
from ambient_dist.fileio import atomic_write_json
from ambient_dist.objective import LossOutput

from .export import export_pipeline
from .latents import LatentLoader, check_latent_model, encode_text, read_latent_manifest
from .loss import TextAmbientLoss
from .sampling import TextSamplerSettings, prompts_for, sample_images
from .sd_models import SCHEDULER_PREDICTION, ModelError, SDComponents, load_components

EXPORT_DIR = "diffusers"
FILTER_REPORT = "text_filter.json"


def describe_text(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML and the U-Net's parameter count (built on the meta device
    from the checkpoint's unet/config.json: no weights are read)."""
    import yaml
    from diffusers import UNet2DConditionModel

    from ambient_dist.config import to_dict
    unet_dir = Path(cfg.text.model_path) / "unet"
    if not (unet_dir / "config.json").is_file():
        raise ConfigError(f"text.model_path: {unet_dir / 'config.json'} not found")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
    params = sum(p.numel() for p in unet.parameters())
    return yaml.safe_dump(to_dict(cfg), sort_keys=False) + f"U-Net parameters (trained): {params}"


def check_text_data(cfg: ExperimentConfig) -> None:
    """data.shards must be latent shards (a clear error before the model is loaded)."""
    try:
        read_latent_manifest(cfg.data.shards)
    except ShardError as e:
        raise ConfigError(f"data.shards: {e}") from None


class ConditionedLoader:
    """Latent batches as the engine's `Batch`, the text embedding in `cond` (stored in the
    shards, or encoded here from the captions by the frozen text encoder)."""

    def __init__(self, latents: LatentLoader, components: SDComponents):
        self.latents, self.components = latents, components

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        b = next(self.latents)
        c = self.components
        cond = b.text if b.text is not None else encode_text(c.text_encoder, c.tokenizer, b.captions)
        return Batch(b.keys, b.clean, b.noisy, labels=None, cond=cond.float())

    def state_dict(self) -> dict:
        return self.latents.state_dict()

    def data_differences(self, saved: dict) -> list[str]:
        return self.latents.data_differences(saved)

    def close(self) -> None:
        self.latents.close()


class TextTask:
    """Stable Diffusion 2.x fine-tuning with the ambient latent objective (module docstring)."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device):
        if not cfg.text.model_path:
            raise ConfigError("text.model_path: set it to a local diffusers-format Stable Diffusion "
                              "2.x directory")
        if cfg.train.compile:
            raise ConfigError("train.compile: not supported for text-conditional training yet "
                              "(set train.compile=false)")
        self.cfg, self.device = cfg, device
        try:
            self.components: SDComponents = load_components(cfg.text.model_path, device=device)
        except ModelError as e:
            raise ConfigError(f"text.model_path: {e}") from None
        have = self.components.scheduler_config.get("prediction_type", "epsilon")
        if have != SCHEDULER_PREDICTION[cfg.text.prediction]:
            raise ConfigError(f"text.prediction is {cfg.text.prediction!r} but {cfg.text.model_path} "
                              f"predicts {have!r} (scheduler/scheduler_config.json); set it to match")
        c = self.components
        self.loss_fn = TextAmbientLoss(cfg, encode_text(c.text_encoder, c.tokenizer, [""]))

    def build_network(self) -> torch.nn.Module:
        unet = self.components.unet.train().requires_grad_(True)
        if self.cfg.text.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return unet

    def build_loader(self, rank: int, world_size: int, start_sample: int) -> ConditionedLoader:
        latents = LatentLoader(self.cfg, rank, world_size, self.device, start_sample=start_sample,
                               vae=self.components.vae)
        check_latent_model(latents.shards.manifest, self.components, f"data.shards ({self.cfg.data.shards})")
        return ConditionedLoader(latents, self.components)

    def loss(self, net: torch.nn.Module, batch: Batch, generator: torch.Generator,
             backward_scale: float = 1.0) -> LossOutput:
        return self.loss_fn(net, batch.clean, batch.noisy, batch.cond, generator=generator,
                            backward_scale=backward_scale)

    def pictures(self) -> dict[str, torch.Tensor]:
        return {}

    def sampling_network(self, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel
        net = UNet2DConditionModel.from_config(self.components.unet.config).to(self.device)
        net.load_state_dict(weights)
        return net.eval().requires_grad_(False)

    def generate(self, net: torch.nn.Module, num_images: int) -> torch.Tensor:
        """Images 0..num_images-1 [N, 3, H, W] in [-1, 1] from the U-Net `net`, guided by the
        training captions (or the prompt file)."""
        bf16 = self.cfg.train.precision == "bf16"
        return sample_images(self.components, prompts_for(self.cfg, num_images),
                             list(range(num_images)), TextSamplerSettings.from_config(self.cfg),
                             self.device, unet=net, autocast_dtype=torch.bfloat16 if bf16 else None)

    def reference_images(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The training and held-out images the latent shards store, in pixels [-1, 1]."""
        return shard_reference_images(self.cfg)

    def attraction(self, net: torch.nn.Module, heldout: torch.Tensor,
                   train: torch.Tensor) -> Optional[dict]:
        """None: the attraction measure denoises pixels with an EDM denoiser; a latent U-Net
        conditioned on captions has no such one-call denoiser."""
        return None

    describe = staticmethod(describe_text)
    check_data = staticmethod(check_text_data)

    def finish(self, weights: dict[str, torch.Tensor], run_dir: Path, is_main: bool) -> None:
        """<run_dir>/diffusers (the base model with the EMA U-Net, loadable by diffusers) and
        text_filter.json (the prediction-magnitude filter's figures), on rank 0."""
        if not is_main:
            return
        path = run_dir / EXPORT_DIR
        export_pipeline(weights, self.cfg.text.model_path, path, self.cfg.text.prediction)
        filtered = self.loss_fn.filter_summary()
        if filtered is not None:
            atomic_write_json(run_dir / FILTER_REPORT, filtered)
            print(f"prediction-magnitude filter (rank 0, this session): dropped "
                  f"{filtered['dropped']} of {filtered['samples']} samples; magnitudes "
                  + ", ".join(f"{k} {v:.3g}" for k, v in filtered["magnitude_percentiles"].items()))
        print(f"diffusers model: {path} (StableDiffusionPipeline.from_pretrained loads it; "
              "ambient-sample-text samples it)")
