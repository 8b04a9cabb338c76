"""Export a fine-tuned U-Net as a complete diffusers-format Stable Diffusion directory.

    export_pipeline(unet_weights, base_model, out_dir, prediction="v")

The result is the base checkpoint with its unet/ replaced by the fine-tuned weights
(safetensors) and its scheduler's prediction type set to what the U-Net was trained to
predict, so diffusers' own StableDiffusionPipeline.from_pretrained(out_dir) loads and samples
it as a stock model. The VAE, text encoder and tokenizer are copied unchanged (they were
frozen). The directory is assembled under a temporary name and renamed into place, so an
interrupted export never leaves a half-written model behind.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import torch

from ambient_dist.fileio import replace_directory

from .sd_models import PARTS, SCHEDULER_PREDICTION, ModelError, read_scheduler_config


def export_pipeline(unet_weights: Mapping[str, torch.Tensor], base_model: str | os.PathLike,
                    out_dir: str | os.PathLike, prediction: str = "v",
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write `out_dir`: the base model with U-Net weights `unet_weights` (diffusers' key
    names, e.g. the EMA of a UNet2DConditionModel's state_dict)."""
    from diffusers import UNet2DConditionModel

    base, out_dir = Path(base_model), Path(out_dir)
    if prediction not in SCHEDULER_PREDICTION:
        raise ValueError(f"text.prediction must be one of {list(SCHEDULER_PREDICTION)}, got {prediction!r}")
    read_scheduler_config(base)  # a clear error if base is not a usable SD directory
    missing = [p for p in PARTS if not (base / p).is_dir()]
    if missing or not (base / "model_index.json").is_file():
        raise ModelError(f"{base}: not a complete diffusers-format model (missing "
                         f"{', '.join(missing) or 'model_index.json'})")
    with replace_directory(out_dir) as tmp:
        for item in base.iterdir():
            if item.name == "unet" or item.name.startswith("."):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)

        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet"))
        result = unet.load_state_dict({k: v.to(torch.float32) for k, v in unet_weights.items()}, strict=True)
        del result  # strict=True already raised on missing or unexpected keys
        unet.to(dtype).save_pretrained(tmp / "unet", safe_serialization=True)

        sched = tmp / "scheduler" / "scheduler_config.json"
        config = json.loads(sched.read_text())
        config["prediction_type"] = SCHEDULER_PREDICTION[prediction]
        sched.write_text(json.dumps(config, indent=2))
    return out_dir
