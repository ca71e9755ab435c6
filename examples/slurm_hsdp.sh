#!/bin/bash
# HSDP pretraining on several nodes under SLURM: FSDP2 sharding inside each node, replication
# across nodes (strategy apollo_hsdp), with shard-aware APOLLO and the memory report.
#
#   mkdir -p logs   # SLURM writes the job's output there (see --output below)
#   sbatch --nodes=2 examples/slurm_hsdp.sh                       # 2 nodes x 8 GPUs
#   sbatch --nodes=4 --export=ALL,GPUS_PER_NODE=4 examples/slurm_hsdp.sh
#
# How it fits together:
# - SLURM starts one task per GPU (--ntasks-per-node = GPUs per node) with `srun`; Lightning's
#   SLURMEnvironment reads SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID / SLURM_NTASKS and
#   SLURM_NODELIST (the first node is the rendezvous address), so nothing else is launched.
# - trainer.num_nodes and trainer.devices must equal --nodes and --ntasks-per-node (Lightning
#   checks it). apollo_hsdp builds the 2-D mesh (replicate = nodes, shard = GPUs per node):
#   parameters, gradients and APOLLO's state are split over a node's GPUs, and only the gradient
#   all-reduce crosses the network. Another layout: --trainer.strategy.device_mesh "[4, 4]" with
#   --trainer.strategy=ApolloFSDPStrategy --trainer.strategy.sharding_strategy=HYBRID_SHARD.
# - Requeue and resume: --signal=SIGUSR1@120 gives Lightning's SLURMEnvironment (auto_requeue) two
#   minutes to save hpc_ckpt_N.ckpt in the working directory and requeue the job before its time
#   runs out; the requeued job (no --ckpt_path given) resumes from the newest hpc_ckpt_N.ckpt by
#   itself. Checkpoints are crash-safe (staged in a hidden .tmp-<pid>/ folder beside them and
#   renamed when complete), so a job killed in the middle of a save (preempted, a node lost)
#   resumes from the previous complete one. To continue another run, pass --ckpt_path PATH.
# - The MemoryProfiler gathers every rank's figures to rank 0, which writes memory_report.json in the
#   run's log folder (one entry per rank; node = rank // GPUS_PER_NODE).
#
# The model size and steps are the 1B recipe of configs/apollo_fsdp.yaml's comments; change them
# there or with more --model/--data/--trainer overrides.

#SBATCH --job-name=apollo-hsdp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# The NCCL network interface, if your cluster needs one named (e.g. ib0); unset by default.
# export NCCL_SOCKET_IFNAME=ib0

srun --ntasks-per-node="${GPUS_PER_NODE}" lightning-memopt fit \
    --config configs/apollo_fsdp.yaml \
    --trainer.strategy=apollo_hsdp \
    --trainer.accelerator=gpu \
    --trainer.num_nodes="${SLURM_NNODES}" \
    --trainer.devices="${GPUS_PER_NODE}" \
    --trainer.precision=bf16-mixed \
    --trainer.max_steps=100000 \
    --model.init_args.model_name=1b \
    --model.init_args.optimizer.init_args.rank=512 \
    --model.init_args.optimizer.init_args.update_proj_gap=200 \
    "$@"
