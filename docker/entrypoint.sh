#!/bin/bash
# Entry point of the harness image: `harness "$@"`.
# With HARNESS_NPROC > 1 (set by `harness run --docker --gpus N`, or by hand), `harness run ...` runs
# under `accelerate launch`, one process per GPU: DDP by default, FSDP2 with
# HARNESS_ACCELERATE_CONFIG=/opt/harness/docker/accelerate/fsdp.yaml (DeepSpeed ZeRO-3, zero3.yaml, is
# refused by the training core for now, in one line: harness/distributed.py). Multi-node: the same
# command on every node with HARNESS_NNODES, HARNESS_NODE_RANK and HARNESS_MASTER_ADDR (torch's
# c10d rendezvous on HARNESS_MASTER_PORT, default 29500).
set -euo pipefail

nproc="${HARNESS_NPROC:-1}"
if [ "$nproc" = "auto" ]; then
    nproc="$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
if [ "${1:-}" != "run" ] || { [ "$nproc" -le 1 ] && [ "${HARNESS_NNODES:-1}" -le 1 ]; }; then
    exec harness "$@"
fi

nnodes="${HARNESS_NNODES:-1}"
launch=(accelerate launch
    --config_file "${HARNESS_ACCELERATE_CONFIG:-/opt/harness/docker/accelerate/ddp.yaml}"
    --num_processes "$((nproc * nnodes))")
if [ "$nnodes" -gt 1 ]; then
    launch+=(--num_machines "$nnodes"
        --machine_rank "${HARNESS_NODE_RANK:?set HARNESS_NODE_RANK (0 on the main node)}"
        --main_process_ip "${HARNESS_MASTER_ADDR:?set HARNESS_MASTER_ADDR (the main node address)}"
        --main_process_port "${HARNESS_MASTER_PORT:-29500}"
        --rdzv_backend c10d)
fi
echo "harness: ${launch[*]} -m harness.cli $*" >&2
exec "${launch[@]}" -m harness.cli "$@"
