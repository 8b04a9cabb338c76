"""ambient_dist.text.sampling: guided sampling, per image and dependent on the sampler."""
import torch

from ambient_dist.text.sampling import TextSamplerSettings, sample_images
from ambient_dist.text.sd_models import load_components

from helpers import RES


def test_guided_sampling_is_per_image_and_sampler_dependent(tiny_model):
    c = load_components(tiny_model)
    prompts = ["the cat", "a dog", "caption 3"]
    settings = TextSamplerSettings(resolution=RES, steps=1, batch_size=3)
    together = sample_images(c, prompts, [0, 1, 2], settings, "cpu")
    alone = sample_images(c, prompts[1:2], [1], TextSamplerSettings(**{**vars(settings), "batch_size": 1}), "cpu")
    assert together.shape == (3, 3, RES, RES)
    torch.testing.assert_close(alone[0], together[1], atol=1e-4, rtol=1e-4)
    euler = sample_images(c, prompts, [0, 1, 2], TextSamplerSettings(**{**vars(settings), "sampler": "euler"}), "cpu")
    unguided = sample_images(c, prompts, [0, 1, 2], TextSamplerSettings(**{**vars(settings), "guidance_scale": 1.0}), "cpu")
    assert not torch.allclose(euler, together) and not torch.allclose(unguided, together)
