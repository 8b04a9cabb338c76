"""Stable Diffusion 2.x components from a local diffusers-format directory, and tiny stand-ins.

A diffusers-format checkpoint is a directory with one sub-directory per component:

    model_index.json   vae/   text_encoder/   tokenizer/   unet/   scheduler/

`load_components(path, parts)` loads only the parts a job needs (latent shards need the VAE
and perhaps the text encoder; training needs the U-Net and the text encoder; nothing is ever
downloaded) and checks that the checkpoint's noise schedule is the DDPM schedule our objective
assumes (ambient_dist.noise.ddpm_alphas_cumprod): a different schedule would put the fixed
noisy latents at the wrong noise level without any error.

`tiny_components()` builds randomly initialised stand-ins with the same classes and the same
8x VAE downsampling as SD 2.x, small enough for CPU tests (`sd2_shaped_components()`: random
weights at SD 2.x's full size, for throughput measurements); `save_components` writes them (or
any components) as a directory that `load_components` and diffusers' StableDiffusionPipeline
both read. The tiny tokenizer is a byte-level BPE vocabulary with a handful of merges,
built in code: no package here ships a real CLIP vocabulary offline.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from ambient_dist.errors import UserError
from ambient_dist.noise import DDPM_BETA_END, DDPM_BETA_START, DDPM_STEPS

PARTS = ("vae", "text_encoder", "tokenizer", "unet")
# The prediction_type names diffusers' schedulers use for our text.prediction values.
SCHEDULER_PREDICTION = {"v": "v_prediction", "epsilon": "epsilon"}

# The Stable Diffusion 2.x U-Net's architecture (stabilityai/stable-diffusion-2 unet/config.json),
# for building it with random weights where the real ones cannot be downloaded.
SD2_UNET_CONFIG = dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                       block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                       down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                       up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                       cross_attention_dim=1024, use_linear_projection=True)
SD2_TEXT_TOKENS = 77


class ModelError(UserError):
    """A missing or unsuitable model directory; the message names the path."""


@dataclass
class SDComponents:
    """The pieces of a Stable Diffusion checkpoint (None for parts that were not loaded)."""

    vae: Optional[torch.nn.Module] = None
    text_encoder: Optional[torch.nn.Module] = None
    tokenizer: Optional[object] = None
    unet: Optional[torch.nn.Module] = None
    scheduler_config: Optional[dict] = None
    path: str = ""

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD 2.x)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        """What the VAE latent is multiplied by to get unit-variance latents (0.18215 in SD)."""
        return float(self.vae.config.scaling_factor)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

def check_schedule(scheduler_config: dict, where: str) -> None:
    """Refuse a checkpoint whose training schedule is not SD's scaled_linear DDPM schedule."""
    expected = {"num_train_timesteps": DDPM_STEPS, "beta_start": DDPM_BETA_START,
                "beta_end": DDPM_BETA_END, "beta_schedule": "scaled_linear"}
    wrong = []
    for k, v in expected.items():
        got = scheduler_config.get(k, v)
        if (abs(got - v) > 1e-9) if isinstance(v, float) else got != v:
            wrong.append(f"{k}={got!r} (expected {v!r})")
    if wrong:
        raise ModelError(f"{where}: noise schedule differs from the DDPM schedule the ambient "
                         f"objective uses: {', '.join(wrong)}")


def read_scheduler_config(path: str | os.PathLike) -> dict:
    file = Path(path) / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise ModelError(f"{file}: not found; text.model_path must be a diffusers-format Stable "
                         "Diffusion directory (with scheduler/, vae/, text_encoder/, tokenizer/, unet/)")
    try:
        config = json.loads(file.read_text())
    except ValueError as e:
        raise ModelError(f"{file}: not valid JSON ({e})") from None
    check_schedule(config, str(file))
    return config


def load_components(path: str | os.PathLike, parts: Iterable[str] = PARTS, device="cpu",
                    dtype: torch.dtype = torch.float32) -> SDComponents:
    """Load `parts` of a local diffusers-format SD 2.x directory (never downloads).

    Frozen parts (VAE, text encoder) are put in eval mode with gradients off; the U-Net is
    returned in train mode with gradients on, ready to fine-tune.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"text.model_path {root}: directory not found")
    parts = tuple(parts)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ModelError(f"load_components: unknown parts {sorted(unknown)} (known: {PARTS})")
    for part in parts:
        if not (root / part).is_dir():
            raise ModelError(f"{root / part}: missing; a diffusers-format Stable Diffusion directory "
                             f"has {', '.join(PARTS)} and scheduler sub-directories")
    out = SDComponents(scheduler_config=read_scheduler_config(root), path=str(root))
    loaders = {
        "vae": lambda: AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype, local_files_only=True),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype,
                                                              local_files_only=True),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
        "unet": lambda: UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype,
                                                             local_files_only=True),
    }
    for part in parts:
        try:
            module = loaders[part]()
        except (OSError, ValueError) as e:
            raise ModelError(f"{root / part}: cannot be loaded ({type(e).__name__}: {e})") from None
        if isinstance(module, torch.nn.Module):
            module = module.to(device)
            frozen = part != "unet"
            module.train(not frozen).requires_grad_(not frozen)
        setattr(out, part, module)
    return out


# --------------------------------------------------------------------------------------
# Tiny stand-ins for tests and CPU benchmarks
# --------------------------------------------------------------------------------------

def tiny_tokenizer(extra_merges: Iterable[str] = ("t h", "th e</w>", "c a", "ca t</w>", "d o",
                                                    "do g</w>")):
    """A CLIPTokenizer over a byte-level vocabulary (every byte alone and word-final) plus a
    few merges and CLIP's two special tokens; 77 tokens per caption like SD's."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())  # the 256 printable stand-ins for the bytes
    tokens = chars + [c + "</w>" for c in chars]
    merges = list(extra_merges)
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)


def tiny_components(seed: int = 0, prediction: str = "v", cross_attention_dim: int = 32) -> SDComponents:
    """Randomly initialised VAE (8x downsampling, 4 latent channels), CLIP text encoder and
    conditional U-Net with SD 2.x's classes and layout, a few hundred thousand parameters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                        sample_size=64, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=cross_attention_dim, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True)
    for m in (vae, text_encoder):
        m.eval().requires_grad_(False)
    return SDComponents(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                        scheduler_config=_scheduler_config(prediction))


def _scheduler_config(prediction: str) -> dict:
    """SD 2.x's DDIM scheduler configuration (the DDPM training schedule of ambient_dist.noise)."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": DDPM_STEPS,
            "beta_start": DDPM_BETA_START, "beta_end": DDPM_BETA_END, "beta_schedule": "scaled_linear",
            "prediction_type": SCHEDULER_PREDICTION[prediction], "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1}


def sd2_shaped_components(seed: int = 0, prediction: str = "v", tokenizer=None) -> SDComponents:
    """Random-weight components with Stable Diffusion 2.x's architecture (U-Net ~865M,
    OpenCLIP-H text encoder ~340M, VAE ~84M parameters): the real model's cost, for
    throughput measurements where the weights cannot be downloaded. The tokenizer is the
    tiny one (token ids only need to lie inside the vocabulary)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tokenizer or tiny_tokenizer()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        norm_num_groups=32, sample_size=768, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, max_position_embeddings=77, projection_dim=1024, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(**SD2_UNET_CONFIG)
    for m in (vae, text_encoder):
        m.eval().requires_grad_(False)
    return SDComponents(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                        scheduler_config=_scheduler_config(prediction))


def build_scheduler(scheduler_config: dict, kind: str = "ddim", prediction: Optional[str] = None):
    """A diffusers sampling scheduler ("ddim" or "euler") on the checkpoint's schedule;
    `prediction` ("v" / "epsilon") overrides the checkpoint's prediction type."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
    if kind not in classes:
        raise ValueError(f"text.sampler: expected one of {', '.join(classes)}, got {kind!r}")
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    if prediction is not None:
        config["prediction_type"] = SCHEDULER_PREDICTION[prediction]
    return classes[kind].from_config(config)


def save_components(components: SDComponents, path: str | os.PathLike,
                    prediction: Optional[str] = None) -> Path:
    """Write a complete diffusers-format directory (what StableDiffusionPipeline loads).

    Written into a temporary sibling and renamed into place, so an interrupted save never
    leaves a half-written model where a complete one is expected."""
    from diffusers import StableDiffusionPipeline

    from ambient_dist.fileio import replace_directory

    path = Path(path)
    scheduler = build_scheduler(components.scheduler_config, "ddim", prediction)
    pipe = StableDiffusionPipeline(vae=components.vae, text_encoder=components.text_encoder,
                                   tokenizer=components.tokenizer, unet=components.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with replace_directory(path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return path
