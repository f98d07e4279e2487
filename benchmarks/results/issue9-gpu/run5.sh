#!/bin/bash
# run5: GPU saves into a not-yet-page-locked buffer stage privately (pinned, reused); tierckpt measured before the baseline.
set -u; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
timeout 100 python3 -m benchmarks.gpu_staging --gib 2 --saves 12 --reps 10 --dcp-saves 4 --json "$OUT/gpu-2gib.json" --verbose > "$OUT/gpu-2gib.log" 2>&1; echo rc=$?
timeout 100 python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.gpu_staging --gib 1 --saves 8 --reps 6 --dcp-saves 3 --json "$OUT/gpu-2rank.json" > "$OUT/gpu-2rank.log" 2>&1; echo rc=$?
ls /dev/shm
for f in gpu-2gib gpu-2rank; do python3 -c "
import json,sys
d=json.load(open(sys.argv[1])); t=d['tierckpt']
print(sys.argv[1], json.dumps(d['summary']))
print(' blocked', [round(x,3) for x in t['blocked_s']], 'committed', [round(x,2) for x in t['committed_s']], 'load', [round(x,3) for x in t['load_s_all']], 'ok', t['loaded_step_ok'], t['n_wrong'], 'dcp', [round(x,3) for x in d['dcp-fs']['blocked_s']], 'raw', d['raw']['raw-pinned'], 'alloc', d['pinned_alloc_s'])
" "$OUT/$f.json" || tail -30 "$OUT/$f.log"; done
grep -i "page-locked\|Staged into\|Traceback\|Error" "$OUT/gpu-2gib.log" | head -40
