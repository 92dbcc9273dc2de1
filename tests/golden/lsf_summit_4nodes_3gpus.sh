#!/bin/bash
# hpctrain job for summit (LSF + jsrun), rendered by `hpctrain jobs render`.
#
# Layout: 4 node(s) x 3 resource sets = 12 ranks; one resource set
# per GPU: 1 rank, 1 GPU and 14 cores (jsrun -a1 -g1 -c14, packed binding).
# Engine: Horovod (HPCTRAIN_BACKEND below).
#
# Run directory: /gpfs/alpine/abc123/scratch/alice/runs/digits-small
# LSF writes the job's output files there, so it must exist before the job starts:
# `hpctrain jobs submit` makes it; before `bsub < job.sh` yourself, run `mkdir -p` on it.
# It is named after the run, not the job: re-submitting this script (bsub < job.sh), or
# LSF re-running the job after a failure or preemption (#BSUB -r keeps the job id),
# resumes from the latest checkpoint there (`hpctrain train --resume=auto`). Each job's
# output is job-<jobid>.out/.err there and jobs.txt lists every job that worked on the
# run. Use another --name for a separate run.
#BSUB -P abc123
#BSUB -W 00:45
#BSUB -nnodes 4
#BSUB -q debug
#BSUB -J digits-small
#BSUB -o /gpfs/alpine/abc123/scratch/alice/runs/digits-small/job-%J.out
#BSUB -e /gpfs/alpine/abc123/scratch/alice/runs/digits-small/job-%J.err
#BSUB -r
# Walltime: 2 min before the limit the job gets SIGUSR1 (checkpoint.write_s = 30 s):
# every rank finishes its step, checkpoints and exits 75, which LSF requeues (-Q).
#BSUB -wa USR1
#BSUB -wt 2
#BSUB -Q "75"
set -euo pipefail

export HPCTRAIN_BACKEND="horovod"
export HDF5_USE_FILE_LOCKING="FALSE"
export OMP_NUM_THREADS="14"
export HOROVOD_FUSION_THRESHOLD="16777216"
export HOROVOD_CYCLE_TIME="2.5"

RUN_DIR=/gpfs/alpine/abc123/scratch/alice/runs/digits-small
mkdir -p "$RUN_DIR"
echo "$LSB_JOBID $(date -u +%Y-%m-%dT%H:%M:%SZ) 12 ranks on 4 node(s)" >> "$RUN_DIR/jobs.txt"
cd @REPO@

# `hpctrain` is the one on the job's PATH (from the setup lines above or the environment the
# scheduler passes on from the submitting shell); `hpctrain jobs render --python PATH` pins one.
jsrun -n 12 -a 1 -c 14 -g 1 -r 3 --bind packed:14 \
    hpctrain train --config @REPO@/configs/digits.toml --resume=auto \
    --set batch.initial=96 \
    --set horovod.fusion_threshold_mb=16 \
    --set horovod.cycle_time_ms=2.5 \
    --set 'run.out_dir="/gpfs/alpine/abc123/scratch/alice/runs"' \
    --set 'run.name="digits-small"'
