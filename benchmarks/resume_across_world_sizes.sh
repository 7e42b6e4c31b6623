#!/usr/bin/env bash
# Train DiT (debug) 10 steps on 1, 2 and 4 GPUs, resume a 4-GPU checkpoint on 2 GPUs and a 2-GPU one
# on 4, in fp32 and bf16, and print each run's largest relative loss difference from one GPU.
#   bash benchmarks/resume_across_world_sizes.sh [out_dir]      (needs 4 GPUs)
set -euo pipefail
out=${1:-/tmp/resume_across_world_sizes}
run() { "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node="$1" -m videosys.run \
  task.steps=10 task.ckpt_every=5 task.log_every=1 task.keep_last=0 task.sample_at_end=false task.batch_size=8 \
  "${@:2}" > "$out/$(date +%s%N).log" 2>&1; }
mkdir -p "$out"
for precision in fp32 bf16; do
  d=$out/$precision
  run 1 precision=$precision run_dir=$d/one
  run 4 precision=$precision parallel=zero3 run_dir=$d/four
  run 2 precision=$precision parallel=zero2 run_dir=$d/two
  run 2 precision=$precision parallel=zero2 resume=$d/four/checkpoints/step_0000005 run_dir=$d/4to2
  run 4 precision=$precision parallel=zero3 resume=$d/two/checkpoints/step_0000005 run_dir=$d/2to4
done
"${PYTHON:-python3}" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
print("precision | run | steps | largest relative loss difference vs 1 GPU")
for precision in ("fp32", "bf16"):
    ref = losses(out / precision / "one")
    for name in ("four", "two", "4to2", "2to4"):
        got = losses(out / precision / name)
        error = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in got)
        print(f"{precision} | {name} | {min(got)}-{max(got)} | {error:.2e}")
PY
