#!/bin/bash
# Issue 9 item 8 on the device machine (one H200): `bash benchmarks/results/issue9-gpu/run.sh`
# from the repository root, results under $OUT (default ./gpu-out). Uses the machine's own
# python3 (its torch with CUDA); tierckpt from src/.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
{
  date -u; uname -r; nproc; free -g | head -2; ulimit -l
  nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
  python3 -c "import torch, xxhash; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  df -h /dev/shm; cat /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
ROOT=/dev/shm
avail=$(df --output=avail -k /dev/shm | tail -1)
if [ "$avail" -lt 50000000 ]; then
  mkdir -p /mnt/tierckpt-gpu && mount -t tmpfs -o size=60g tmpfs /mnt/tierckpt-gpu && ROOT=/mnt/tierckpt-gpu
fi
echo "memory root under $ROOT" | tee -a "$OUT/machine.txt"
run() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"
  grep -v "saved to memory\|loaded step\|UserWarning\|return func" "$OUT/$name.log" | tail -60
}
run gpu-2gib 150 python3 -m benchmarks.gpu_staging --gib 2 --saves 10 --reps 10 --root "$ROOT" --json "$OUT/gpu-2gib.json" --verbose
run gpu-2rank 120 python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.gpu_staging --gib 0.5 --saves 6 --reps 5 --dcp-saves 2 --root "$ROOT" --json "$OUT/gpu-2rank.json"
run gpu-8gib 150 python3 -m benchmarks.gpu_staging --gib 8 --saves 6 --reps 5 --dcp-saves 0 --root "$ROOT" --json "$OUT/gpu-8gib.json"
ls /dev/shm "$ROOT" | head
