#!/bin/bash
# hpctrain job for local (Slurm + srun), rendered by `hpctrain jobs render`.
#
# Layout: 1 node(s) x 2 ranks = 2 ranks, 1 CPU(s) per rank.
# Engine: Horovod (HPCTRAIN_BACKEND below).
#
# Run directory: /gpfs/alpine/abc123/scratch/alice/runs/digits
# Slurm writes the job's output files there, so it must exist before the job starts:
# `hpctrain jobs submit` makes it; before `sbatch job.sh` yourself, run `mkdir -p` on it.
# It is named after the run, not the job: re-submitting this script (sbatch job.sh), or
# Slurm requeueing the job after a preemption or node failure (--requeue keeps the job
# id), resumes from the latest checkpoint there (`hpctrain train --resume=auto`). Each
# job's output is job-<jobid>.out/.err there and jobs.txt lists every job that worked on
# the run. Use another --name for a separate run.
#SBATCH -J digits
#SBATCH -N 1
#SBATCH --ntasks-per-node=2
#SBATCH -c 1
#SBATCH -t 00:10:00
#SBATCH -o /gpfs/alpine/abc123/scratch/alice/runs/digits/job-%j.out
#SBATCH -e /gpfs/alpine/abc123/scratch/alice/runs/digits/job-%j.err
#SBATCH --requeue
#SBATCH --open-mode=append
# Walltime: 120 s before the limit every rank gets SIGUSR1 (checkpoint.write_s = 30 s),
# finishes its step, checkpoints and exits 75; the script then requeues the job,
# which resumes from that checkpoint.
#SBATCH --signal=USR1@120
set -euo pipefail

export HPCTRAIN_BACKEND="horovod"
export HDF5_USE_FILE_LOCKING="FALSE"
export OMP_NUM_THREADS="1"
export HOROVOD_FUSION_THRESHOLD="67108864"
export HOROVOD_CYCLE_TIME="1"

RUN_DIR=/gpfs/alpine/abc123/scratch/alice/runs/digits
mkdir -p "$RUN_DIR"
echo "$SLURM_JOB_ID $(date -u +%Y-%m-%dT%H:%M:%SZ) 2 ranks on 1 node(s)" >> "$RUN_DIR/jobs.txt"
cd @REPO@

# Exit 75: stopped on a signal with a checkpoint written; requeue (same job id).
rc=0
# srun does not inherit -c from the allocation on every Slurm version, so the step repeats it;
# --kill-on-bad-exit ends the whole step as soon as one rank fails.
# `hpctrain` is the one on the job's PATH (from the setup lines above or the environment the
# scheduler passes on from the submitting shell); `hpctrain jobs render --python PATH` pins one.
srun -N 1 -n 2 --ntasks-per-node=2 -c 1 --kill-on-bad-exit=1 --mpi=pmix \
    hpctrain train --config @REPO@/configs/digits.toml --resume=auto \
    --set 'run.out_dir="/gpfs/alpine/abc123/scratch/alice/runs"' \
    --set 'run.name="digits"' || rc=$?
if [ "$rc" -eq 75 ]; then
    echo "hpctrain: checkpointed on a stop signal; requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
