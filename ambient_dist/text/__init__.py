"""Text-conditional ambient fine-tuning of Stable Diffusion 2.x (latent v / epsilon prediction).

    sd_models     load a local diffusers-format checkpoint (VAE, CLIP text encoder, tokenizer,
                  U-Net, scheduler config); tiny random stand-ins for tests
    latents       latent shards: the fixed VAE latent and its ONE fixed noisy latent at t_n,
                  captions and optional text embeddings; their reader and loader
    mitigations   text-memorization mitigations: caption dropout (for guidance), noise on the
                  text embedding, dropping samples with a large text-conditional prediction
    loss          the text-conditional ambient loss (v or epsilon prediction) with the mitigations
    task          TextTask: what the engine's Trainer trains when task: text
    sampling      classifier-free guided DDIM / Euler sampling from captions or a prompt file
    export        the fine-tuned U-Net as a diffusers directory StableDiffusionPipeline loads
    throughput    img/s of latent shards and training with random-weight models (tiny or SD 2.x size)

The submodules import diffusers / transformers, so import them where used.
"""
