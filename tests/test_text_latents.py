"""ambient_dist.text.latents: latent shards, their loader, the make-shards --latent command.

The SD components are the tiny stand-ins of the `tiny_model` fixture (tests/conftest.py; their
own tests are in test_text_sd_models.py). The img2dataset input is written with webdataset's
own TarWriter (helpers.write_img2dataset).
"""
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ambient_dist.config import ConfigError
from ambient_dist.data import load_images
from ambient_dist.data.shards import ShardError
from ambient_dist.data.sources import open_source
from ambient_dist.noise import ddpm_alpha_sigma, keyed_normal
from ambient_dist.text.latents import (
    LATENT_EXT, LatentLoader, LatentShardOptions, LatentShardSet, encode_latents, encode_text,
    make_latent_shards)
from ambient_dist.text.sd_models import load_components, tiny_components

from helpers import RES, global_random_states, latent_config

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------
# Latent shards
# --------------------------------------------------------------------------------------

def test_latent_shards_round_trip(latent_shards):
    out, components, opts = latent_shards
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["form"] == "latent_v" and manifest["t_n"] == 50
    assert manifest["counts"] == {"train": 10, "heldout": 2, "skipped": 0, "duplicates": 0, "converted": 0,
                                  "captionless_kept": 0}
    assert manifest["latent_shape"] == [4, RES // 8, RES // 8] and len(manifest["shards"]) == 4
    s = LatentShardSet(out)
    keys, images, _ = load_images(out)  # the pixel reader sees the clean images as usual
    assert images.shape == (10, RES, RES, 3) and keys == s.keys
    alpha, sig = (float(v) for v in ddpm_alpha_sigma(50))
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    z0 = encode_latents(components.vae, pixels, keys, opts.noise_seed, components.scaling_factor)
    text = encode_text(components.text_encoder, components.tokenizer, [s.caption(i) for i in range(len(s))])
    for i, key in enumerate(keys):
        latent = torch.from_numpy(s.latent(i)).float()
        # The stored latent is the keyed posterior draw of the stored image (float16).
        torch.testing.assert_close(latent, z0[i], atol=2e-3, rtol=2e-3)
        # The noisy latent is alpha_tn z0 + s_tn eta with the key's own eta.
        expected = alpha * latent + sig * keyed_normal(latent.shape, opts.noise_seed, key)
        torch.testing.assert_close(torch.from_numpy(s.noisy(i)).float(), expected, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(torch.from_numpy(s.text_embedding(i)).float(), text[i], atol=2e-3, rtol=2e-3)
        assert s.caption(i).startswith("caption ")
    # The posterior draw is a draw, not the mean: the keyed noise matters.
    mean = components.vae.encode(pixels[:1]).latent_dist.mean * components.scaling_factor
    assert (mean - z0[:1]).abs().max() > 1e-3


def test_latent_shards_resume_and_refuse_other_options(latent_shards, laion):
    out, components, opts = latent_shards
    source = open_source(str(laion), "webdataset")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    for rank in (0, 1):
        make_latent_shards(source, out, opts, components, rank=rank, world_size=2, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    other = LatentShardOptions(**{**vars(opts), "t_n": 100})
    with pytest.raises(ShardError, match="different source, model or options"):
        make_latent_shards(source, out, other, components, progress=False)


def test_loader_batches_and_manifest_checks(latent_shards, tiny_model):
    out, _, _ = latent_shards
    cfg = latent_config(out, tiny_model)
    rng_before = global_random_states()  # the run's RNGs, which a checkpoint restores
    loader = LatentLoader(cfg, 0, 1, "cpu")
    seen = []
    for _ in range(5):  # two epochs of 10 samples, batches of 4 straddling the boundary
        b = next(loader)
        assert b.clean.shape == b.noisy.shape == (4, 4, RES // 8, RES // 8) and b.text.shape[:2] == (4, 77)
        seen += b.keys
    assert global_random_states() == rng_before
    assert sorted(seen[:10]) == sorted(LatentShardSet(out).keys)
    assert loader.state_dict()["samples_seen"] == 20
    resumed = LatentLoader(cfg, 0, 1, "cpu", start_sample=8)
    assert next(resumed).keys == seen[8:12]
    # Two ranks see disjoint halves of each global batch.
    two = [LatentLoader(latent_config(out, tiny_model, "train.batch=8"), r, 2, "cpu") for r in (0, 1)]
    k0, k1 = next(two[0]).keys, next(two[1]).keys
    assert not set(k0) & set(k1) and k0 + k1 == seen[:8]
    with pytest.raises(ConfigError, match="objective.t_n is 100.*t_n 50"):
        LatentLoader(latent_config(out, tiny_model, "objective.t_n=100"), 0, 1, "cpu")


def test_online_shards_encode_the_same_latents(tiny_model, laion, latent_shards, tmp_path):
    stored, components, opts = latent_shards
    online = tmp_path / "online"
    make_latent_shards(open_source(str(laion), "webdataset"), online,
                       LatentShardOptions(**{**vars(opts), "online": True, "text_embeddings": False}),
                       components, progress=False)
    s = LatentShardSet(online)
    assert s.online and LATENT_EXT not in s.extra
    with pytest.raises(ShardError, match="needs the VAE"):
        LatentLoader(latent_config(online, tiny_model), 0, 1, "cpu")
    batch = LatentLoader(latent_config(online, tiny_model), 0, 1, "cpu", vae=components.vae)
    b_online = next(batch)
    b_stored = next(LatentLoader(latent_config(stored, tiny_model), 0, 1, "cpu"))
    assert b_online.keys == b_stored.keys and b_online.text is None
    torch.testing.assert_close(b_online.clean, b_stored.clean, atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(b_online.noisy, b_stored.noisy, atol=0, rtol=0)
    # DALI decodes the same PNGs (CPU backend here, the GPU one on a GPU): the same batches.
    rng_before = global_random_states()  # and neither path draws from the run's RNGs
    dali = LatentLoader(latent_config(online, tiny_model, "data.loader=dali", "data.workers=1"),
                        0, 1, "cpu", vae=components.vae)
    pil = LatentLoader(latent_config(online, tiny_model), 0, 1, "cpu", vae=components.vae)
    assert dali.pipe is not None and pil.pipe is None
    for _ in range(2):
        b_dali, b_pil = next(dali), next(pil)
        assert b_dali.keys == b_pil.keys
        assert torch.equal(b_dali.clean, b_pil.clean) and torch.equal(b_dali.noisy, b_pil.noisy)
    assert global_random_states() == rng_before


def test_make_shards_latent_cli(tiny_model, laion, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "launchers"))
    import make_shards
    out = tmp_path / "cli"
    rc = make_shards.main(["--latent", "--model", str(tiny_model), "--source", "img2dataset",
                           "--path", str(laion), "--out", str(out), "--resolution", str(RES),
                           "--t-n", "25", "--samples-per-shard", "6", "--quiet"])
    assert rc == 0 and "12 latent samples in 2 shards" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["t_n"] == 25
    rc = make_shards.main(["--latent", "--source", str(laion), "--out", str(tmp_path / "x"), "--quiet"])
    assert rc == 2 and "--latent needs --model" in capsys.readouterr().err


def test_training_refuses_latents_of_another_vae(latent_shards, tiny_model, tmp_path):
    from ambient_dist.text.latents import check_latent_model
    out, _, _ = latent_shards
    manifest = json.loads((out / "manifest.json").read_text())
    check_latent_model(manifest, load_components(tiny_model, ("vae",)), "here")  # same VAE: fine
    other = tmp_path / "other-vae"
    shutil.copytree(tiny_model, other)
    tiny_components(seed=1).vae.save_pretrained(other / "vae")  # same config, other weights
    with pytest.raises(ConfigError, match=r"here: the latents were made with another VAE.*weights"):
        check_latent_model(manifest, load_components(other, ("vae",)), "here")


def test_undecodable_images_stop_or_are_skipped_and_listed(tiny_model, laion, tmp_path):
    import webdataset as wds
    from ambient_dist.data.sources import SourceError
    src_dir = tmp_path / "with-bad"
    shutil.copytree(laion, src_dir)
    with wds.TarWriter(str(src_dir / "99999.tar")) as sink:
        sink.write({"__key__": "broken", "jpg": b"not a jpeg", "txt": "a broken image"})
    components = load_components(tiny_model, ("vae",))
    opts = LatentShardOptions(resolution=RES, samples_per_shard=20)
    with pytest.raises(SourceError, match="99999.tar"):
        make_latent_shards(open_source(str(src_dir), "webdataset"), tmp_path / "a", opts, components,
                           progress=False)
    opts.skip_bad = True
    manifest = make_latent_shards(open_source(str(src_dir), "webdataset"), tmp_path / "b", opts,
                                  components, progress=False)
    assert manifest["counts"]["train"] == 12 and manifest["counts"]["skipped"] == 1
    assert manifest["skipped"][0]["key"] == "broken"


def test_captionless_samples_follow_the_stated_policy_and_are_counted(tiny_model, tmp_path, capsys):
    """Field case: 6 JPEGs, 3 without a .txt, went silently onto the empty caption."""
    import webdataset as wds
    src = tmp_path / "captions"
    src.mkdir()
    rng = np.random.default_rng(1)
    with wds.TarWriter(str(src / "00000.tar")) as sink:
        for k in range(6):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
            sample = {"__key__": f"s{k}", "jpg": buf.getvalue()}
            if k % 2 == 0:
                sample["txt"] = f"caption {k}"
            sink.write(sample)
    sys.path.insert(0, str(ROOT / "launchers"))
    import make_shards
    base = ["--latent", "--model", str(tiny_model), "--source", "img2dataset", "--path", str(src),
            "--resolution", str(RES), "--quiet"]
    assert make_shards.main(base + ["--out", str(tmp_path / "default")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "(sample s1)" in err and "no caption" in err
    assert "--missing-caption skip" in err and "Traceback" not in err
    assert make_shards.main(base + ["--out", str(tmp_path / "skip"), "--missing-caption", "skip"]) == 0
    out = capsys.readouterr().out
    skip = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert skip["counts"]["train"] == 3 and skip["counts"]["skipped"] == 3
    assert {s["key"] for s in skip["skipped"]} == {"s1", "s3", "s5"}
    assert "skipped 3 source samples" in out and "no caption" in out
    assert make_shards.main(base + ["--out", str(tmp_path / "empty"), "--missing-caption", "empty"]) == 0
    out = capsys.readouterr().out
    kept = json.loads((tmp_path / "empty" / "manifest.json").read_text())
    assert kept["counts"]["train"] == 6 and kept["counts"]["captionless_kept"] == 3
    assert kept["missing_caption"] == "empty" and "kept 3 samples without a caption" in out


# --------------------------------------------------------------------------------------
# Ingest loses nothing silently; the manifest is checked against the latents
# --------------------------------------------------------------------------------------

def _copy_shards(latent_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(latent_shards[0], out)
    return out, json.loads((out / "manifest.json").read_text())


def test_an_edited_latent_manifest_is_refused_naming_the_field(latent_shards, tiny_model, tmp_path):
    from ambient_dist.text.latents import read_latent_manifest
    out, m = _copy_shards(latent_shards, tmp_path)
    for field, value in (("t_n", 25), ("scaling_factor", 1.0), ("online", True), ("noise_seed", 0)):
        edited = json.loads(json.dumps(m))
        edited[field] = value
        (out / "manifest.json").write_text(json.dumps(edited))
        for read in (read_latent_manifest, LatentShardSet):
            with pytest.raises(ShardError, match=f"manifest field {field} differs from what make_shards wrote"):
                read(out)
    cfg = latent_config(out, tiny_model, "objective.t_n=25")
    with pytest.raises(ShardError, match="manifest field noise_seed differs"):
        LatentLoader(cfg, 0, 1, "cpu")


def test_a_resealed_latent_manifest_is_refused_by_the_latents(latent_shards, tmp_path):
    from ambient_dist.data.shards import write_manifest
    out, m = _copy_shards(latent_shards, tmp_path)
    alpha, s = ddpm_alpha_sigma(400)
    m.update(t_n=400, sigma_tn=float(s / alpha))  # consistent with each other, not with the data
    write_manifest(out, m)
    with pytest.raises(ShardError, match=rf"field t_n says 400, but the stored noisy copies have noise "
                                         rf"std [\d.]+ \(expected {float(s):.4g}; measured on 8 samples\)"):
        LatentShardSet(out)
    m.update(t_n=50)  # sigma_tn left at t_n 400's value
    write_manifest(out, m)
    with pytest.raises(ShardError, match=r"field sigma_tn says .*, but t_n 50 gives s_tn / alpha_tn"):
        LatentShardSet(out)


def test_a_latent_shard_cut_short_is_refused(latent_shards, tmp_path):
    out, m = _copy_shards(latent_shards, tmp_path)
    tar = out / m["shards"][1]["name"]
    tar.write_bytes(tar.read_bytes()[:-2048])
    with pytest.raises(ShardError, match=rf"{tar.name}: \d+ bytes, the manifest says "
                                         rf"{m['shards'][1]['bytes']} \(cut short"):
        LatentShardSet(out, verify=False)


def test_duplicates_in_latent_ingest_follow_the_policy(tiny_model, laion, tmp_path):
    from helpers import write_wds_tar
    from ambient_dist.data.sources import SourceError
    src_dir = tmp_path / "overlap"
    shutil.copytree(laion, src_dir)
    first = open_source(str(laion), "webdataset")
    again = first.load(3)  # a sample of the first shard, downloaded once more into a new shard
    buf = io.BytesIO()
    Image.fromarray(again.image).save(buf, format="PNG")
    write_wds_tar(src_dir / "99999.tar", [{"__key__": again.key, "png": buf.getvalue(), "txt": "other"}])
    components = load_components(tiny_model, ("vae",))
    opts = LatentShardOptions(resolution=RES, samples_per_shard=20)
    with pytest.raises(SourceError, match=rf"99999.tar \(sample {again.key}\): repeats .*00000.tar "
                                          rf"\(sample {again.key}\) \(same key, another image"):
        make_latent_shards(open_source(str(src_dir), "webdataset"), tmp_path / "a", opts, components,
                           progress=False)
    opts.duplicates = "keep-first"
    manifest = make_latent_shards(open_source(str(src_dir), "webdataset"), tmp_path / "b", opts,
                                  components, progress=False)
    assert manifest["counts"]["train"] == 12 and manifest["counts"]["duplicates"] == 1
    assert manifest["duplicates"][0]["where"].endswith(f"99999.tar (sample {again.key})")
    s = LatentShardSet(tmp_path / "b")
    assert s.caption(s.keys.index(again.key)) == again.caption  # the first one's caption
