"""Training engine: the loop, EMA, checkpoints, learning-rate schedule, logging.

    run.py         run_training(cfg, run_dir, resume): the whole job (what ambient-train
                   calls), build_trainer, finish (end of run); describe(cfg): --describe
    trainer.py     Trainer: the loop, EMA, schedule, stop flag, checkpoint cadence
    task.py        Task: what is trained (ImageTask; text.task.TextTask)
    backend.py     Backend: how a step runs (PlainBackend: single-process PyTorch)
    deepspeed_backend.py  DeepSpeedBackend: ZeRO 1/2/3, bf16 master weights
    ema.py         EMA with EDM semantics (half-life in images, ramp-up)
    power_ema.py   PowerEMA: EDM2's power-function EMAs and their snapshots (ema.kind=power)
    checkpoint.py  atomic checkpoints (safetensors + weights-only state), keep last K
    lr.py          learning-rate ramp
    logging.py     TensorBoard scalars/histograms/images, training statistics over all ranks,
                   and the progress line (ambient_dist.progress)

Rank / world size and the small collectives live one layer lower, in ambient_dist.distributed
(shared with metrics). The submodules are imported where used (not here), so that the
building blocks do not pull in the networks, data and metrics packages.
"""
