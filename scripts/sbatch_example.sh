#!/bin/bash
# Submit one plmtool run as a Slurm batch job:  sbatch scripts/sbatch_example.sh
# (for sweeps, prefer `plmtool ... -m launcher=slurm`, which submits a job array through submitit).
#SBATCH --job-name=plmtool-prune
#SBATCH --partition=gpu
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --output=outputs/slurm/%x-%j.out
#SBATCH --requeue
set -euo pipefail
# An environment with plmtool installed (`make install`).
source "${PLMTOOL_VENV:-.venv}/bin/activate"
# A fixed run dir makes a requeued job resume from its last finished stage.
RUN_DIR="outputs/prune/slurm-${SLURM_JOB_ID}"
plmtool prune sds model=llama3-8b data=c4 hydra.run.dir="$RUN_DIR" "$@"
