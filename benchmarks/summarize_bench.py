"""Markdown table of bench.json files (from `task=bench`) and of peer JSON lines.

python benchmarks/summarize_bench.py multirun/bench_dit_xl2 [peer.jsonl ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = (
    "| implementation | mode | batch | act. ckpt | ms/step | samples/s | model TFLOP/s | MFU | executed TFLOP/s "
    "| peak GiB |"
)


def videosys_row(bench: dict) -> str:
    mfu = f"{bench['mfu']:.1%}" if bench["mfu"] else "-"
    return (
        f"| videosys {bench['flavor']} | {bench['mode']} | {bench['input_shape'][0]} | "
        f"{'yes' if bench['activation_checkpointing'] else 'no'} | {bench['latency_ms']['mean']:.1f} | "
        f"{bench['samples_per_second']:.1f} | {bench['achieved_tflops']:.1f} | {mfu} | "
        f"{bench.get('executed_tflops', bench['achieved_tflops']):.1f} | {bench['peak_memory_gib']:.1f} |"
    )


def peer_row(peer: dict) -> str:
    return (
        f"| {peer['peer']} | {peer['mode']} | {peer['batch_size']} | no | {peer['latency_ms_mean']:.1f} | "
        f"{peer['samples_per_second']:.1f} | {peer['achieved_tflops']:.1f} | - | {peer['achieved_tflops']:.1f} | "
        f"{peer['peak_memory_gib']:.1f} |"
    )


def main(paths: list[str]) -> None:
    rows = []
    for path in map(Path, paths):
        if path.is_dir():
            benches = [json.loads(f.read_text()) for f in path.rglob("bench.json")]
            benches.sort(key=lambda b: (b["mode"], b["activation_checkpointing"], b["input_shape"][0]))
            rows += [videosys_row(b) for b in benches]
        else:
            rows += [peer_row(json.loads(line)) for line in path.read_text().splitlines() if line.startswith("{")]
    print("\n".join([HEADER, "|" + "---|" * 10, *rows]))


if __name__ == "__main__":
    main(sys.argv[1:])
