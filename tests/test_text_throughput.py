"""ambient_dist.text.throughput: the throughput harness runs the real paths."""
import json

import torch

from helpers import RES


def test_throughput_harness_runs_the_real_paths(tmp_path):
    from ambient_dist.text.throughput import measure
    result = measure("tiny", RES, images=8, batch=4, steps=1, precision="fp32", workdir=tmp_path,
                     device=torch.device("cpu"))
    assert result["latent_shards_img_per_s"] > 0 and result["train_img_per_s"] > 0
    assert result["unet_parameters"] == 203204
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["counts"]["train"] == 8
