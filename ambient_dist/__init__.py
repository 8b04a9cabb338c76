"""ambient_dist: distributed training of diffusion models that create rather than copy.

Below a noise level sigma_tn the model learns from clean images; above it only from one fixed
noisy copy of each image, with the ambient loss (see docs and shared spec objective.md).

Modules (one job each):
    config      typed experiment configuration, validated once, saved with every run
    noise       keyed noise and the one fixed noisy copy per image
    objective   Algorithm 1: sigma sampling, branch rule, the two-branch loss (reference)
    models/     EDM preconditioning and U-Nets (DDPM++, NCSN++, ADM)
    data/       sources, shard writer, loaders (resident, webdataset, DALI)
    engine/     training loop, EMA, checkpoints, logging, DeepSpeed
    sampling    EDM samplers
    posthoc_ema power-function EMA profiles, snapshots, post-hoc reconstruction (EDM2)
    metrics/    feature extractors, FID, memorization, reports
"""
__version__ = "0.1.0"
