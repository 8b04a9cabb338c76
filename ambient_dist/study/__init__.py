"""A memorization study: the paper's Tables 1-2 and Figures 1 and 3 from one study file.

    ambient-study configs/studies/fashion-mnist-cpu.yaml

A study file names a base experiment config, the training-set sizes, the runs (plain DDPM is
`method: ambient, sigma_tn: 0`; Algorithm 1 at several sigma_tn; the noise-only and masking
baselines) and the seeds. For every (run, size, seed) the study

    1. shards    makes the shards the run needs (its sigma_tn's noisy copies, or the fixed
                 masks), with held-out images; the training subset is the same for every run
                 and seed (subset seed fixed), the noise seed is the run's seed
    2. train     ambient-train (python -m ambient_dist.cli.train) as a subprocess (--resume auto: an interrupted run continues)
    3. sample    evaluation.num_samples images from the EMA (resumable sample store)
    4. evaluate  quality (KID with its standard error, and FID, Inception pool3, against a
                 fixed set of held-out real images), memorization in pixel space and each
                 configured feature space (calibrated by held-out images never trained on),
                 and the denoiser attraction of held-out images at high sigma (Figure 3)

and then writes report.md + report.json with the Table 1/2-style table (mean and spread over
seeds), the Figure 1 trade-off plot, the Figure 3 panel and copy galleries. Every run's config
is built and validated before anything starts (names are plain names, sizes fit the source),
so a bad key or an impossible option is refused up front, naming the key.

Reuse: each stage records a digest of its complete inputs beside its result and is reused on a
rerun only when the current study file gives the same digest (stages.py lists the inputs);
each digest contains the one before it, so a changed input redoes its stage and every later
one. Shards, samples and evaluation are redone (cheap, deterministic; a new data plan is a new
shard directory). Training continues from its checkpoints when only the schedule got longer
(or reporting options changed); a change its checkpoints cannot continue under (trajectory
options, data, a shorter schedule) is refused before anything starts, naming it, unless the
run is named in --retrain (its directory is deleted and it trains from scratch). The report
is built only from results made under the current study file; runs without one and figures
that cannot be drawn are named in it. A run that fails is reported and the others go on;
run_study then raises StudyFailed naming the failed runs (ambient-study exits 1).

Processes (runner.py, process.py, worker.py, slurm.py). The study holds its directory's lock
(ambient_dist.locking: a second invocation is refused, naming the owner's pid and host; a
lock left by a dead process does not block) and makes every run's shards itself, one after
the other. Then, with `executor local`, each run is one worker process (worker.py: it locks
the run directory, shares the lock with its trainer, and runs stages.run_one), `jobs` at a
time, each in its own process group; SIGINT / SIGTERM to the study are forwarded to every
worker, which forwards them to its trainer (it checkpoints and exits); queued runs are not
started; the study exits 130 / 143 with one line saying how to continue. With `executor slurm`
each run is one SLURM job through submitit (slurm.py: a Checkpointable that checkpoints and
requeues on preemption or time limit; a registry in slurm/jobs.json so that running the study
again shows each job's state, collects what finished and submits only what is neither done,
queued nor running); the study file's `slurm:` section (StudySlurm) sets the job's partition,
account, nodes, GPUs per node, CPUs, memory, time limit, requeues, extra sbatch options and
setup lines.

Layout of the study directory (`out`, default studies/<name>):
    study.yaml                 the resolved study file
    shards/n<size>-tn<sigma_tn>[-mask<p>]-seed<seed>-<plan digest>/
                               shard directories (+ study-shards.json: the data plan), shared
                               by the runs that need the same data
    runs/<run>-n<size>-s<seed>/  training runs (config.yaml, checkpoints, ema.safetensors,
                               train.log, samples/, study-train.json, study-sample.json,
                               study-eval.json, study-attraction.pt, study-failed.json)
    configs/<run>-n<size>-s<seed>/config.yaml   what each run was trained with
    cache/                     reference features (Inception) of the held-out images
    report.md, report.json, figures/
    slurm/                     with executor slurm: jobs.json (run -> job id), submitit's job
                               scripts, pickles and logs
    .lock, .lock.owner         the study's lock and its owner (pid, host, command); each run
                               directory has its own (+ worker.log: the run's worker output)
"""
from ambient_dist.study.config import (STAGES, RunSpec, StudyConfig, StudyData, StudyError,
                                       StudyEvaluation, StudyFailed, StudyRun, StudySlurm,
                                       load_study)
from ambient_dist.study.runner import StudyOutcome, run_study

__all__ = ["STAGES", "RunSpec", "StudyConfig", "StudyData", "StudyError", "StudyEvaluation",
           "StudyFailed", "StudyOutcome", "StudyRun", "StudySlurm", "load_study", "run_study"]
