#!/usr/bin/env bash
# DiT-XL/2 at 256x256 (latent 4x32x32, 1000 classes) on one GPU: bf16 training steps at several
# batch sizes, with activation checkpointing at a large batch, and inference forward steps.
# Each job writes bench.json under $BENCH_DIR/<sweep>/<job>/; extra arguments are passed on.
#   launch/bench_dit_xl2.sh && python benchmarks/summarize_bench.py "$BENCH_DIR"
set -euo pipefail
BENCH_DIR=${BENCH_DIR:-multirun/bench_dit_xl2}
common=(task=bench model.flavor=XL/2 data=synthetic precision=bf16)
"${PYTHON:-python}" -m videosys.run -m "${common[@]}" task.mode=train task.batch_size=32,64,128 \
  task.warmup_steps=5 task.steps=20 hydra.sweep.dir="$BENCH_DIR/train" "$@"
"${PYTHON:-python}" -m videosys.run -m "${common[@]}" task.mode=train task.batch_size=256 task.activation_checkpointing=true \
  task.warmup_steps=3 task.steps=10 hydra.sweep.dir="$BENCH_DIR/train_ac" "$@"
"${PYTHON:-python}" -m videosys.run -m "${common[@]}" task.mode=forward task.batch_size=64,256 \
  task.warmup_steps=5 task.steps=20 hydra.sweep.dir="$BENCH_DIR/forward" "$@"
