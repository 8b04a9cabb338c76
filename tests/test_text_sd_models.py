"""ambient_dist.text.sd_models: tiny SD components on disk, their tokenizer, errors naming the path.

The models are tiny randomly initialised stand-ins (tiny_components) with SD 2.x's classes and
8x VAE downsampling. The tokenizer is a tiny byte-level BPE vocabulary built in code: no
installed package ships a real CLIP vocabulary offline.
"""
import json
import shutil

import pytest
import torch

from ambient_dist.text.sd_models import (
    ModelError, load_components, tiny_components, tiny_tokenizer)


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------

def test_tokenizer_is_clip_shaped():
    tok = tiny_tokenizer()
    ids = tok(["the cat", ""], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    assert ids.shape == (2, 77)
    assert int(ids[0, 0]) == tok.bos_token_id and int(ids[1, 1]) == tok.eos_token_id
    # "the" and "cat" are merged words of the tiny vocabulary: one token each.
    assert int(ids[0, 3]) == tok.eos_token_id


def test_saved_components_load_back_with_the_same_weights(tiny_model):
    made = tiny_components(seed=0)
    loaded = load_components(tiny_model)
    for part in ("vae", "text_encoder", "unet"):
        a, b = getattr(made, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.vae_scale_factor == 8 and loaded.scaling_factor == pytest.approx(0.18215)
    assert loaded.unet.training and not loaded.vae.training
    assert not any(p.requires_grad for p in loaded.text_encoder.parameters())
    only_vae = load_components(tiny_model, ("vae",))
    assert only_vae.unet is None and only_vae.text_encoder is None


def test_model_errors_name_the_path(tiny_model, tmp_path):
    with pytest.raises(ModelError, match="directory not found"):
        load_components(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelError, match=r"broken/unet: missing"):
        load_components(broken)
    load_components(broken, ("vae",))  # a part that is there still loads
    config = broken / "scheduler" / "scheduler_config.json"
    c = json.loads(config.read_text())
    c["beta_schedule"] = "linear"
    config.write_text(json.dumps(c))
    with pytest.raises(ModelError, match=r"scheduler_config.json: noise schedule.*beta_schedule"):
        load_components(broken, ("vae",))
