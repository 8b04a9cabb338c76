"""Training engine: the loop, EMA, checkpoints, learning-rate schedule, logging.

    run.py         run_training(cfg, run_dir, resume): the whole job (what launchers/train.py
                   calls); describe(cfg): what `train.py --describe` prints
    trainer.py     Trainer: the loop (single process, plain PyTorch)
    deepspeed_engine.py  DeepSpeedTrainer: the same loop on DeepSpeed (ZeRO 1/2/3, bf16)
    distributed.py rank / world size from any launcher, process group, small collectives
    ema.py         EMA with EDM semantics (half-life in images, ramp-up)
    checkpoint.py  atomic checkpoints (safetensors + weights-only state), keep last K
    lr.py          learning-rate ramp
    logging.py     TensorBoard scalars/histograms/images and the tqdm progress line

The submodules are imported where used (not here), so that the building blocks do not pull
in the networks, data and metrics packages.
"""
