"""Latent shards for Stable Diffusion fine-tuning: the fixed latent and its ONE fixed noisy copy.

For latent v-prediction (shared spec, objective.md section 4) the data are VAE latents:
z0 = scaling_factor * (one fixed sample of the VAE posterior), and the ambient branch sees only
z_tn = alpha_tn z0 + s_tn eta, made once per image. Both depend on the image's stable key only:

    latent sample noise   keyed_normal(..., noise_seed, f"{key}/vae")  (the VAE's posterior draw)
    noisy-copy noise      noise.make_noisy_copy(z0, ..., noise_seed, key, form="latent_v", t_n)

so a re-run, another rank, or the online mode (which re-encodes the image during training)
gets the same latent sample for the same image.

A latent shard directory is a pixel shard directory (ambient_dist.data.shards) with more
members per sample, so the pixel tools (ShardSet, load_images for evaluation) read it as is:

    <key>.png         the clean image at the training resolution (evaluation compares samples
                      with it; the online mode encodes it during training)
    <key>.noisy.npy   float16 [4, h, w] noisy latent z_tn (never clipped)
    <key>.json        {"key", "label", "caption", "meta"}
    <key>.latent.npy  float16 [4, h, w] clean latent z0            (not in online mode)
    <key>.text.npy    float16 [77, D] text-encoder output            (with --text-embeddings)

The manifest adds form "latent_v", t_n, the latent shapes, the VAE scaling factor, the model
directory and "online". Writing is batched (the VAE runs on the given device), shows progress,
is resumable (finished shards are kept after a checksum check) and splits over ranks: rank r
writes shards r, r + W, ...; each rank records its finished shards in parts/, and whichever
rank finishes last writes the complete manifest.

Reading: `LatentShardSet` (a ShardSet with the extra members) and `LatentLoader`, an endless
iterator of `TextBatch`es in the order every loader of the project uses (data.order).
"""
from __future__ import annotations

import concurrent.futures as futures
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ambient_dist.config import ConfigError, ExperimentConfig
from ambient_dist.data.augment import to_model_units
from ambient_dist.data.loader import PlannedLoader
from ambient_dist.data.order import RankPlan, SampleOrder
from ambient_dist.data.shards import (
    CLEAN_EXT, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, META_EXT, NOISY_EXT, ShardError,
    ShardSet, ShardWriter, count_conversion, encode_npy, finite_array,
    check_seal, merge_conversions, read_index, read_manifest, scan_tar, write_manifest)
from ambient_dist.data.sources import DUPLICATE_POLICIES, FIT_MODES, Source, SourceError
from ambient_dist.fileio import atomic_write_json, sha256_file
from ambient_dist.images import encode_png
from ambient_dist.noise import ddpm_alpha_sigma, keyed_normal, make_noisy_copy
from ambient_dist.progress import progress as progress_bar

from .sd_models import SDComponents

LATENT_EXT, TEXT_EXT = "latent.npy", "text.npy"
PARTS_DIR = "parts"


# --------------------------------------------------------------------------------------
# The encoders, shared by the shard writer, the online loader and the trainer
# --------------------------------------------------------------------------------------

@torch.no_grad()
def encode_latents(vae: torch.nn.Module, images: torch.Tensor, keys: list[str], noise_seed: int,
                   scaling_factor: float) -> torch.Tensor:
    """images float [B, 3, H, W] in [-1, 1] -> z0 float32 [B, 4, H/8, W/8].

    z0 = scaling_factor * (mean + std * n_key): one fixed draw from the VAE's posterior per
    image, its noise keyed by the image (not by the batch it happens to be in).
    """
    param = next(vae.parameters())
    posterior = vae.encode(images.to(param.device, param.dtype)).latent_dist
    noise = torch.stack([keyed_normal(posterior.mean.shape[1:], noise_seed, f"{k}/vae") for k in keys])
    sample = posterior.mean.float() + posterior.std.float() * noise.to(posterior.mean.device)
    return sample * scaling_factor


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids [B, L] padded/truncated to the tokenizer's length (77 for SD)."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_text(text_encoder: torch.nn.Module, tokenizer, captions: list[str]) -> torch.Tensor:
    """Captions -> the text encoder's last hidden states [B, L, D] (what SD's U-Net attends to;
    SD 2.x checkpoints already drop the last CLIP layer in their config)."""
    device = next(text_encoder.parameters()).device
    return text_encoder(tokenize(tokenizer, captions).to(device))[0]


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

MISSING_CAPTION_POLICIES = ("error", "skip", "empty")


@dataclass
class LatentShardOptions:
    """Everything that decides the content of a latent shard directory (besides source, model)."""

    resolution: int = 256
    fit: str = "crop"
    t_n: int = 50
    noise_seed: int = 0
    count: int = 0
    per_class: int = 0
    subset_seed: int = 0
    heldout: int = 0
    samples_per_shard: int = 1000
    text_embeddings: bool = False     # also store the text-encoder output of each caption
    online: bool = False              # store no clean latent: training encodes the image
    # A sample without a caption (no .txt member, or an empty one): "error" stops with its
    # name, "skip" leaves it out (listed with the skipped images), "empty" keeps it on the
    # empty caption, i.e. as an unconditional sample (the classifier-free-guidance null
    # prompt). Skipped and kept-empty samples are counted in the manifest and on screen.
    missing_caption: str = "error"
    # Source samples that repeat an earlier one (data.sources.find_duplicates): "error"
    # refuses them, "keep-first" keeps the first and lists the others in the manifest.
    duplicates: str = "error"
    # Not part of the content (duplicates decides which keys are written; those are hashed):
    batch_size: int = 32
    workers: int = 4                  # image decoding threads
    skip_bad: bool = False            # skip (and list) undecodable images instead of stopping

    def content(self) -> dict:
        d = asdict(self)
        for k in ("batch_size", "workers", "skip_bad", "duplicates"):
            d.pop(k)
        if d["missing_caption"] == "error":  # the data of earlier shards: same plan hash
            d.pop("missing_caption")
        return d


def _check_options(opts: LatentShardOptions) -> None:
    def bad(flag, msg):
        raise ShardError(f"{flag}: {msg}")
    if not 0 <= opts.t_n < 1000:
        bad("--t-n", f"must be a DDPM timestep in [0, 1000), got {opts.t_n}")
    if opts.resolution < 8 or opts.resolution % 8:
        bad("--resolution", f"must be a multiple of 8 (the VAE's downsampling), got {opts.resolution}")
    if opts.fit not in FIT_MODES:
        bad("--fit", f"expected one of {', '.join(FIT_MODES)}, got {opts.fit!r}")
    if opts.samples_per_shard < 1 or opts.batch_size < 1:
        bad("--samples-per-shard/--batch", "must be >= 1")
    if opts.duplicates not in DUPLICATE_POLICIES:
        bad("--duplicates", f"expected one of {', '.join(DUPLICATE_POLICIES)}, got {opts.duplicates!r}")
    if opts.missing_caption not in MISSING_CAPTION_POLICIES:
        bad("--missing-caption", f"expected one of {', '.join(MISSING_CAPTION_POLICIES)}, "
            f"got {opts.missing_caption!r}")


def _vae_weights_digest(components: SDComponents) -> str | None:
    """sha256 of the VAE's weight file(s) on disk (None for in-memory components)."""
    files = sorted(Path(components.path, "vae").glob("*.safetensors")) if components.path else []
    return "-".join(sha256_file(f)[:16] for f in files) or None


def _model_description(components: SDComponents) -> dict:
    """What identifies the encoders: a different VAE gives different latents."""
    vae = dict(components.vae.config)
    desc = {"path": components.path, "vae_config": {k: v for k, v in vae.items() if not k.startswith("_")},
            "vae_weights": _vae_weights_digest(components)}
    if components.text_encoder is not None:
        desc["text_encoder"] = components.text_encoder.config.name_or_path or "in-memory"
    return desc


class _LatentWriter:
    """Writes the shards of one rank, batch by batch through the VAE."""

    def __init__(self, shards: ShardWriter, opts: LatentShardOptions, components: SDComponents,
                 device):
        self.shards, self.source, self.opts, self.c = shards, shards.source, opts, components
        self.device = torch.device(device)
        self.pool = futures.ThreadPoolExecutor(max(opts.workers, 1))

    def _load_one(self, i: int):
        try:
            record = self.shards.sample(i)
        except SourceError as e:
            if not self.opts.skip_bad:
                raise
            return {"key": self.source.key(i), "where": self.source.where(i), "error": str(e)}
        caption, policy = record[3], self.opts.missing_caption
        if not (caption or "").strip():
            if policy == "error":
                raise ShardError(f"{self.source.where(i)}: no caption (no .txt member, or an empty "
                                 "one); choose what to do with --missing-caption skip (leave such "
                                 "samples out) or --missing-caption empty (train them on the empty "
                                 "caption, as unconditional samples)")
            if policy == "skip":
                return {"key": self.source.key(i), "where": self.source.where(i),
                        "error": "no caption (--missing-caption skip)"}
            record[4]["caption_missing"] = True  # kept on the empty caption: counted below
        return record

    def _load(self, indices: list[int]) -> tuple[list[tuple], list[dict]]:
        """(decoded records, skipped-image reports) of `indices`, decoded in threads."""
        loaded = list(self.pool.map(self._load_one, indices))
        return [r for r in loaded if isinstance(r, tuple)], [r for r in loaded if isinstance(r, dict)]

    def write(self, name: str, indices: list[int], bar: tqdm) -> dict:
        o, c = self.opts, self.c
        skipped, converted = [], {}
        captionless = 0
        with self.shards.shard(name) as shard:
            final = shard.path
            for start in range(0, len(indices), o.batch_size):
                records, bad = self._load(indices[start: start + o.batch_size])
                skipped += bad
                bar.update(len(bad))
                if not records:
                    continue
                keys = [r[0] for r in records]
                pixels = np.stack([r[1] for r in records])
                clean = to_model_units(torch.from_numpy(pixels).permute(0, 3, 1, 2))
                # Stored in float16; the noisy copy is made from the stored value so that
                # the two members agree exactly.
                z0 = encode_latents(c.vae, clean.to(self.device), keys, o.noise_seed,
                                    c.scaling_factor).half().cpu()
                captions = [r[3] or "" for r in records]
                text = (encode_text(c.text_encoder, c.tokenizer, captions).half().cpu()
                        if o.text_embeddings else None)
                for j, (key, image, label, caption, meta) in enumerate(records):
                    where = f"{final}, key {key}"
                    noisy = make_noisy_copy(z0[j].float(), 0.0, o.noise_seed, key, "latent_v", o.t_n)
                    shard.add(f"{key}.{CLEAN_EXT}", encode_png(image))
                    shard.add(f"{key}.{NOISY_EXT}", encode_npy(
                        finite_array(noisy.numpy().astype(np.float16), where, "noisy latent")))
                    record = {"key": key, "label": label, "caption": caption or "", "meta": meta}
                    shard.add(f"{key}.{META_EXT}", json.dumps(record, sort_keys=True).encode())
                    count_conversion(converted, meta)
                    captionless += bool(meta.get("caption_missing"))
                    if not o.online:
                        shard.add(f"{key}.{LATENT_EXT}",
                                  encode_npy(finite_array(z0[j].numpy(), where, "VAE latent")))
                    if text is not None:
                        shard.add(f"{key}.{TEXT_EXT}",
                                  encode_npy(finite_array(text[j].numpy(), where, "text embedding")))
                bar.update(len(records))
        entry = shard.publish(skipped, converted)
        entry["captionless"] = captionless
        return entry


def _part_path(out_dir: Path, rank: int, world_size: int) -> Path:
    return out_dir / PARTS_DIR / f"rank-{rank:05d}-of-{world_size:05d}.json"


def make_latent_shards(source: Source, out_dir: str | os.PathLike, opts: LatentShardOptions,
                       components: SDComponents, rank: int = 0, world_size: int = 1,
                       device="cpu", overwrite: bool = False, progress: bool = True) -> dict:
    """Write this rank's latent shards (resuming finished ones); return the manifest, which is
    complete (manifest["complete"]) once every rank has finished."""
    _check_options(opts)
    if components.vae is None or (opts.text_embeddings and components.text_encoder is None):
        raise ShardError("make_latent_shards: components need the VAE (and the text encoder "
                         "and tokenizer for --text-embeddings)")
    if not 0 <= rank < world_size:
        raise ShardError(f"rank {rank} outside world size {world_size}")
    out_dir = Path(out_dir)
    shards = ShardWriter(source, out_dir, opts.resolution, 3, opts.fit)
    train, heldout, duplicates = shards.choose(opts.count, opts.per_class, opts.heldout,
                                               opts.subset_seed, opts.duplicates)
    jobs = shards.jobs(train, opts.samples_per_shard)
    desc = {**source.describe(), "model": _model_description(components)}
    plan = shards.plan_hash(jobs, heldout, opts.content(), desc)

    out_dir.mkdir(parents=True, exist_ok=True)
    part_path = _part_path(out_dir, rank, world_size)
    part_path.parent.mkdir(exist_ok=True)
    done = _finished_shards(shards, part_path, plan, overwrite)
    mine = [(j.name, j.indices) for k, j in enumerate(jobs) if k % world_size == rank]
    part = {"plan": plan, "rank": rank, "world_size": world_size, "complete": False,
            "shards": [done[n] for n, _ in mine if n in done]}
    atomic_write_json(part_path, part)

    writer = _LatentWriter(shards, opts, components, device)
    bar = progress_bar(total=sum(len(ix) for _, ix in mine), unit="img", disable=not progress,
               desc=f"latent shards (rank {rank}/{world_size}) -> {out_dir}")
    bar.update(sum(len(ix) for n, ix in mine if n in done))
    try:
        for name, indices in mine:
            if name in done:
                continue
            part["shards"].append(writer.write(name, indices, bar))
            atomic_write_json(part_path, part)
    finally:
        writer.pool.shutdown()
        bar.close()
    if rank == 0 and heldout:
        part["heldout"] = shards.write_heldout(heldout)
    part["complete"] = True
    atomic_write_json(part_path, part)

    vae_factor = components.vae_scale_factor
    alpha_tn, s_tn = ddpm_alpha_sigma(opts.t_n)
    latent_shape = [int(components.vae.config.latent_channels), opts.resolution // vae_factor,
                    opts.resolution // vae_factor]
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "complete": False, "plan": plan,
        # The copies' noise level in VE units of the latents, s_tn / alpha_tn (for reading
        # only: latent training is configured by objective.t_n).
        "sigma_tn": float(s_tn / alpha_tn), "form": "latent_v", "t_n": opts.t_n,
        "noise_seed": opts.noise_seed,
        "subset_seed": opts.subset_seed, "resolution": opts.resolution, "channels": 3,
        "num_classes": source.num_classes, "class_names": list(source.class_names), "fit": opts.fit,
        "selection": {"count": opts.count, "per_class": opts.per_class, "heldout": opts.heldout},
        "source": desc, "counts": {}, "shards": [], "heldout": None, "skipped": [],
        "duplicates": duplicates, "duplicates_policy": opts.duplicates,
        "latent_shape": latent_shape, "noisy_shape": latent_shape,
        "scaling_factor": components.scaling_factor, "online": opts.online,
        "text_embeddings": opts.text_embeddings, "missing_caption": opts.missing_caption,
        "members": {"clean": CLEAN_EXT, "noisy": NOISY_EXT, "meta": META_EXT,
                    "latent": None if opts.online else LATENT_EXT,
                    "text": TEXT_EXT if opts.text_embeddings else None,
                    "noisy_dtype": "float16", "noisy_layout": "CHW"},
    }
    return _assemble_manifest(out_dir, manifest, [j.name for j in jobs], world_size, len(heldout))


def _finished_shards(shards: ShardWriter, part_path: Path, plan: str, overwrite: bool) -> dict[str, dict]:
    """Shards this rank (or a complete earlier run) finished and whose checksum still holds."""
    entries = []
    for path in (shards.out_dir / MANIFEST_NAME, part_path):
        if not path.is_file() or overwrite:
            continue
        try:
            old = json.loads(path.read_text())
        except ValueError as e:
            raise ShardError(f"{path}: not valid JSON ({e}); delete it to start over") from None
        if path.name == MANIFEST_NAME:  # an older unsealed one is rebuilt from the options
            check_seal(old, path, require_seal=False)
        if old.get("plan") != plan:
            raise ShardError(f"{path}: this directory holds latent shards made from a different "
                             "source, model or options; choose another --out or pass --overwrite")
        entries += old.get("shards", [])
    return {e["name"]: e for e in entries if shards.finished(e)}


def _assemble_manifest(out_dir: Path, manifest: dict, names: list[str], world_size: int,
                       heldout: int) -> dict:
    """Merge the ranks' part files into manifest.json once all of them are complete."""
    entries, held = {}, None
    for r in range(world_size):
        path = _part_path(out_dir, r, world_size)
        part = json.loads(path.read_text()) if path.is_file() else {}
        if not part.get("complete") or part.get("plan") != manifest["plan"]:
            return manifest  # another rank is still writing; the last one to finish assembles
        entries.update({e["name"]: e for e in part["shards"]})
        held = held or part.get("heldout")
    missing = [n for n in names if n not in entries]
    if missing:
        raise ShardError(f"{out_dir}: the ranks finished but shards {missing[:3]} are missing")
    manifest["shards"] = [entries[n] for n in names]
    manifest["heldout"] = held
    manifest["skipped"] = [s for e in manifest["shards"] for s in e.get("skipped", [])]
    manifest["converted"] = merge_conversions(manifest["shards"])
    manifest["counts"] = {"train": sum(e["samples"] for e in manifest["shards"]),
                          "heldout": heldout, "skipped": len(manifest["skipped"]),
                          "duplicates": len(manifest["duplicates"]),
                          "converted": sum(manifest["converted"].values()),
                          "captionless_kept": sum(e.get("captionless", 0) for e in manifest["shards"])}
    manifest["complete"] = True
    write_manifest(out_dir, manifest)
    return manifest


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------

def check_latent_manifest(manifest: dict, cfg: ExperimentConfig) -> None:
    """Refuse latent shards made for another objective, t_n or resolution than `cfg` trains."""
    where = f"data.shards ({cfg.data.shards})"
    problems = []
    if manifest.get("form") != "latent_v":
        problems.append(f"the shards hold pixels (form {manifest.get('form')!r}), not latents; make "
                        "them with ambient-make-shards --latent --model PATH")
    else:
        if cfg.objective.form != "latent_v":
            problems.append(f"objective.form is {cfg.objective.form!r}; latent shards train 'latent_v'")
        if manifest["t_n"] != cfg.objective.t_n:
            problems.append(f"objective.t_n is {cfg.objective.t_n}, the shards' noisy latents are at "
                            f"t_n {manifest['t_n']} (remake them with --t-n {cfg.objective.t_n})")
        if manifest["resolution"] != cfg.data.resolution:
            problems.append(f"data.resolution is {cfg.data.resolution}, shards are {manifest['resolution']} px")
    if cfg.data.subset > manifest["counts"]["train"]:
        problems.append(f"data.subset is {cfg.data.subset} but the shards hold only "
                        f"{manifest['counts']['train']} images")
    if problems:
        raise ConfigError(f"{where} do not match the config: " + "; ".join(problems))


def check_latent_model(manifest: dict, components: SDComponents, where: str) -> None:
    """Refuse to train on latents another VAE made: they would decode to other images."""
    made = manifest["source"].get("model", {})
    have = json.loads(json.dumps(_model_description(components)))
    diff = sorted(k for k in set(made.get("vae_config", {})) | set(have["vae_config"])
                  if made.get("vae_config", {}).get(k) != have["vae_config"].get(k))
    if None not in (made.get("vae_weights"), have["vae_weights"]) and made["vae_weights"] != have["vae_weights"]:
        diff.append("weights")
    if diff:
        raise ConfigError(f"{where}: the latents were made with another VAE ({made.get('path')}) than "
                          f"text.model_path's ({components.path}): differs in {', '.join(diff[:5])}; "
                          "remake the shards with this model")


class LatentShardSet(ShardSet):
    """A ShardSet that also reads the clean latent and the stored text embedding."""

    def __init__(self, shards_dir, verify: bool = True, verify_share: tuple[int, int] = (0, 1)):
        super().__init__(shards_dir, verify, verify_share)
        m = self.manifest
        if m.get("form") != "latent_v":
            raise ShardError(f"{self.dir}: pixel shards (form {m.get('form')!r}); latent training "
                             "needs shards made with make_shards.py --latent")
        self.online = bool(m["online"])
        self.latent_shape = tuple(m["latent_shape"])
        self.has_text = bool(m["text_embeddings"])
        wanted = ([] if self.online else [LATENT_EXT]) + ([TEXT_EXT] if self.has_text else [])
        self.extra: dict[str, np.ndarray] = {ext: np.zeros((len(self), 2), np.int64) for ext in wanted}
        i = 0
        for entry, path in zip(m["shards"], self.paths):
            index_path = self.dir / entry["index"]
            for key, comps in (read_index(index_path) if index_path.is_file() else scan_tar(path)):
                for ext in wanted:
                    if ext not in comps:
                        raise ShardError(f"{path}, key {key}: no .{ext} member in the sample")
                    self.extra[ext][i] = comps[ext]
                i += 1
        self.check_latent_noise()

    def check_latent_noise(self) -> None:
        """The manifest's t_n (and sigma_tn = s_tn / alpha_tn) against the data: the stored
        noisy latents minus alpha_tn x the clean ones must have std s_tn. Online shards store
        no clean latent (the seal alone protects their t_n)."""
        m = self.manifest
        alpha, s_tn = ddpm_alpha_sigma(m["t_n"])
        if not np.isclose(float(m["sigma_tn"]), float(s_tn / alpha), rtol=1e-6):
            self._refuse("sigma_tn", m["sigma_tn"], f"t_n {m['t_n']} gives s_tn / alpha_tn = "
                         f"{float(s_tn / alpha):.6g}")
        if self.online:
            return
        pairs = self._readable(lambda i: (self.noisy(i), self.latent(i)), self.check_samples())
        if pairs:
            residual = torch.stack([torch.from_numpy(z).float() - float(alpha) * torch.from_numpy(z0).float()
                                    for z, z0 in pairs])
            self.check_noise_level(residual, float(s_tn), "t_n", m["t_n"])

    def _npy(self, i: int, ext: str, shape=None) -> np.ndarray:
        off, size = self.extra[ext][i]
        try:
            arr = np.load(io.BytesIO(self._member(i, int(off), int(size))), allow_pickle=False)
        except ShardError:
            raise
        except Exception as e:
            raise ShardError(f"{self.paths[int(self.shard_of[i])]}, key {self.keys[i]}: .{ext} is "
                             f"not a readable .npy ({e})") from None
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise ShardError(f"{self.paths[int(self.shard_of[i])]}, key {self.keys[i]}: .{ext} has "
                             f"shape {list(arr.shape)}, expected {list(shape)}")
        return finite_array(arr, f"{self.paths[int(self.shard_of[i])]}, key {self.keys[i]}", f".{ext} member")

    def latent(self, i: int) -> np.ndarray:
        return self._npy(i, LATENT_EXT, self.latent_shape)

    def text_embedding(self, i: int) -> np.ndarray:
        return self._npy(i, TEXT_EXT)

    def caption(self, i: int) -> str:
        t = self.table[i]
        return json.loads(self._member(i, int(t[4]), int(t[5]))).get("caption") or ""

    def noisy(self, i: int) -> np.ndarray:
        t = self.table[i]
        return self.decode_noisy(i, self._member(i, int(t[2]), int(t[3])))

    def image(self, i: int) -> np.ndarray:
        t = self.table[i]
        return self.decode_clean(i, self._member(i, int(t[0]), int(t[1])))


@dataclass
class TextBatch:
    keys: list[str]
    clean: torch.Tensor              # float32 [B, 4, h, w] clean latents z0
    noisy: torch.Tensor              # float32 [B, 4, h, w] fixed noisy latents z_tn
    captions: list[str]
    text: Optional[torch.Tensor]     # float32 [B, L, D] stored text-encoder output, or None


class LatentLoader(PlannedLoader):
    """This rank's micro-batches of latent shards, endlessly, in the project's data order
    (data.order: a global permutation per epoch, rank r taking its slice of each step).

    Reads members straight from the memory-mapped tars (a few KB per sample). Online shards
    have no clean latent: the image is decoded -- by the DALI pipeline of data.dali_loader
    (on the GPU when there is one) with data.loader "dali", else by PIL -- and VAE-encoded
    here, on `device`, with the same keyed posterior draw the shard writer used. No flips: a
    flipped latent is not the latent of the flipped image, and captions can say "left".
    """

    def __init__(self, cfg: ExperimentConfig, rank: int, world_size: int, device,
                 start_sample: int = 0, vae: Optional[torch.nn.Module] = None):
        if not cfg.data.shards:
            raise ShardError("data.shards: no shard directory set (make one with "
                             "ambient-make-shards --latent)")
        self.device = torch.device(device)
        shards = LatentShardSet(cfg.data.shards, verify=True, verify_share=(rank, world_size))
        check_latent_manifest(shards.manifest, cfg)
        if shards.online and vae is None:
            raise ShardError(f"{cfg.data.shards}: online shards hold no clean latents; the loader "
                             "needs the VAE to encode the images")
        self.vae = vae
        num_samples = cfg.data.subset or len(shards)
        order = SampleOrder(num_samples, cfg.data.seed, xflip=False)
        plan = RankPlan(cfg.micro_batch(world_size), world_size, rank, start_sample)
        super().__init__(cfg, shards, num_samples, order, plan)
        self.pipe = None
        if self.shards.online and cfg.data.loader == "dali":
            from ambient_dist.data.dali_loader import BatchFeeder, build_pipeline
            # DALI's iteration n is this rank's step n, as in the pixel DALI loader.
            self.pipe = build_pipeline(BatchFeeder(self.shards, self.order, self.plan),
                                       self.plan.micro_batch, 3, self.device, cfg.data.workers)

    def __next__(self) -> TextBatch:
        # Counted before the batch is read, as this loader always has (PlannedLoader counts after).
        indices, _ = self.step_samples(self.steps_done)
        self.steps_done += 1
        return self.batch(indices)

    def batch(self, indices) -> TextBatch:
        s = self.shards
        keys = [s.keys[i] for i in indices]
        if self.pipe is not None:
            from ambient_dist.data.dali_loader import to_torch
            images, noisy = (to_torch(t, self.device) for t in self.pipe.run())
        else:
            noisy = torch.from_numpy(np.stack([s.noisy(i) for i in indices])).float()
            if s.online:
                images = to_model_units(torch.from_numpy(np.stack([s.image(i) for i in indices])))
        if s.online:
            clean = encode_latents(self.vae, images.to(self.device), keys,
                                   s.manifest["noise_seed"], s.manifest["scaling_factor"])
        else:
            clean = torch.from_numpy(np.stack([s.latent(i) for i in indices])).float()
        text = (torch.from_numpy(np.stack([s.text_embedding(i) for i in indices])).float()
                if s.has_text else None)
        return TextBatch(keys, clean.to(self.device), noisy.to(self.device),
                         [s.caption(i) for i in indices],
                         None if text is None else text.to(self.device))

    def close(self) -> None:
        self.pipe = None


def training_captions(shards_dir: str | os.PathLike, count: int) -> list[str]:
    """The captions of the first `count` training samples (stored order; data.subset takes
    this same prefix), e.g. as prompts for sampling near the training set."""
    shards = LatentShardSet(shards_dir, verify=False)
    return [shards.caption(i) for i in range(min(count, len(shards)))]


def read_latent_manifest(shards_dir: str | os.PathLike) -> dict:
    manifest = read_manifest(shards_dir)
    if manifest.get("form") != "latent_v":
        raise ShardError(f"{shards_dir}: not latent shards (form {manifest.get('form')!r})")
    return manifest


__all__ = ["encode_latents", "encode_text", "tokenize", "LatentShardOptions", "make_latent_shards",
           "check_latent_manifest", "check_latent_model", "LatentShardSet", "LatentLoader", "TextBatch",
           "read_latent_manifest", "training_captions"]
