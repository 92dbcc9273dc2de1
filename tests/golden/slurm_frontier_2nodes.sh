#!/bin/bash
# hpctrain job for frontier (Slurm + srun), rendered by `hpctrain jobs render`.
#
# Layout: 2 node(s) x 8 ranks = 16 ranks, 7 CPU(s) and one GPU per rank.
# Engine: torch.distributed (HPCTRAIN_BACKEND below); every rank reads its rank and the rendezvous
# (first node of the step, a port from the job id) from srun's SLURM_* variables: no torchrun.
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
#SBATCH -A abc123
#SBATCH -N 2
#SBATCH --ntasks-per-node=8
#SBATCH -c 7
#SBATCH --gpus-per-task=1
#SBATCH --gpu-bind=closest
#SBATCH -t 02:00:00
#SBATCH -p batch
#SBATCH -o /gpfs/alpine/abc123/scratch/alice/runs/digits/job-%j.out
#SBATCH -e /gpfs/alpine/abc123/scratch/alice/runs/digits/job-%j.err
#SBATCH --requeue
#SBATCH --open-mode=append
# Walltime: 120 s before the limit every rank gets SIGUSR1 (checkpoint.write_s = 30 s),
# finishes its step, checkpoints and exits 75; the script then requeues the job,
# which resumes from that checkpoint.
#SBATCH --signal=USR1@120
set -euo pipefail

export HPCTRAIN_BACKEND="torch"
export HDF5_USE_FILE_LOCKING="FALSE"
export OMP_NUM_THREADS="7"
export NCCL_SOCKET_IFNAME="hsn0"
export MIOPEN_USER_DB_PATH="/tmp/miopen-$USER"
export MIOPEN_CUSTOM_CACHE_DIR="/tmp/miopen-$USER"

RUN_DIR=/gpfs/alpine/abc123/scratch/alice/runs/digits
mkdir -p "$RUN_DIR"
echo "$SLURM_JOB_ID $(date -u +%Y-%m-%dT%H:%M:%SZ) 16 ranks on 2 node(s)" >> "$RUN_DIR/jobs.txt"
cd @REPO@

# Exit 75: stopped on a signal with a checkpoint written; requeue (same job id).
rc=0
# srun does not inherit -c from the allocation on every Slurm version, so the step repeats it;
# --kill-on-bad-exit ends the whole step as soon as one rank fails.
# `hpctrain` is the one on the job's PATH (from the setup lines above or the environment the
# scheduler passes on from the submitting shell); `hpctrain jobs render --python PATH` pins one.
srun -N 2 -n 16 --ntasks-per-node=8 -c 7 --kill-on-bad-exit=1 --cpu-bind=cores --gpus-per-task=1 --gpu-bind=closest \
    hpctrain train --config @REPO@/configs/digits.toml --resume=auto \
    --set 'run.out_dir="/gpfs/alpine/abc123/scratch/alice/runs"' \
    --set 'run.name="digits"' || rc=$?
if [ "$rc" -eq 75 ]; then
    echo "hpctrain: checkpointed on a stop signal; requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
