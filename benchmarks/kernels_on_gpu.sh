#!/usr/bin/env bash
# The GPU measurements of the `kernels` group (one GPU), recorded in docs/benchmarks.md:
#   bash benchmarks/kernels_on_gpu.sh STAGE... [--out DIR]
# Stages:
#   tests      the Triton kernel tests and kernel-selection tests on the GPU (pytest -m gpu and the rest)
#   kernels    each fused kernel's bandwidth vs device copy, vs eager and vs torch.compile (bench_kernels.py)
#   tune       sweep each kernel pass's launch parameters, suggest fused.LAUNCH (tune_kernels.py, ~3 min)
#   attention  TFLOP/s per attention backend at Open-Sora / Latte / CogVideoX shapes (bench_attention.py)
#   dit        DiT-XL/2 256px bf16 training samples/s with kernels none, fused, compile, fused_compile
#   opensora   Open-Sora 1.2 480p x 51 frames denoising-step latency with the same four presets
#   nan        1000 bf16 training steps of DiT-XL/2 on synthetic data with kernels=fused (Triton kernels
#              in every block), every step logged
set -euo pipefail
out=/tmp/kernels_on_gpu
stages=()
while [ $# -gt 0 ]; do
  case $1 in --out) out=$2; shift 2 ;; *) stages+=("$1"); shift ;; esac
done
py=${PYTHON:-python3}
mkdir -p "$out"
presets=(none fused compile fused_compile)
for stage in "${stages[@]}"; do
  case $stage in
    tests) (cd tests && $py -m pytest -q -p no:cacheprovider test_fused_kernels.py test_kernels.py) ;;
    kernels) $py benchmarks/bench_kernels.py --out "$out/kernels.json" ;;
    tune) $py benchmarks/tune_kernels.py --out "$out/tune.json" ;;
    attention) $py benchmarks/bench_attention.py --out "$out/attention.json" ;;
    dit)
      for k in "${presets[@]}"; do
        $py -m videosys.run task=bench model.flavor=XL/2 data=synthetic precision=bf16 task.mode=train \
          task.batch_size=64 task.warmup_steps=5 task.steps=30 kernels=$k run_dir="$out/dit_$k" > "$out/dit_$k.log" 2>&1
      done
      $py - "$out" "${presets[@]}" <<'PY'
import json, sys
from pathlib import Path
out, presets = Path(sys.argv[1]), sys.argv[2:]
rows = {k: json.loads((out / f"dit_{k}" / "bench.json").read_text()) for k in presets}
base = rows[presets[0]]["samples_per_second"]
print("DiT-XL/2 256px bf16 train, batch 64 | samples/s | speedup | peak GiB")
for k, r in rows.items():
    print(f"{k:14} | {r['samples_per_second']:8.1f} | {r['samples_per_second'] / base:5.2f}x | {r['peak_memory_gib']:.2f}")
PY
      ;;
    opensora)
      $py benchmarks/bench_video.py --only opensora --configs "480p 51f" --kernels "$(IFS=,; echo "${presets[*]}")" \
        --out "$out/opensora.json" ;;
    nan)
      $py -m videosys.run model.flavor=XL/2 data=synthetic precision=bf16 kernels=fused task.steps=1000 \
        task.batch_size=64 task.log_every=1 task.ckpt_every=100000 task.sample_at_end=false run_dir="$out/nan" \
        > "$out/nan.log" 2>&1
      tail -3 "$out/nan.log"
      $py - "$out/nan" <<'PY'
import json, math, sys
from pathlib import Path
rows = [json.loads(line) for line in (Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines()]
losses = [r["loss"] for r in rows if "loss" in r]
norms = [r["grad_norm"] for r in rows if "grad_norm" in r]
steps = [r["step"] for r in rows if "loss" in r]
finite = all(math.isfinite(v) for v in losses + norms)
print(f"1000-step bf16 DiT-XL/2 kernels=fused: {len(losses)} logged steps up to {max(steps)}, all finite: {finite}, "
      f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, largest grad norms (step, norm): "
      f"{sorted(zip(steps, norms), key=lambda sn: -sn[1])[:3]}")
PY
      ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
