"""Training speed on this CPU: images per second of one training step (forward, cross-entropy,
backward, AdamW) in the default memory format and fp32, with ``channels_last``, and with
``channels_last`` and bf16 autocast, in interleaved turns.

    python benchmarks/train_speed.py [--nets tiny_cnn@28 mobilenetv2_0.5@28 ...]
        [--batch 64] [--steps 30] [--block 3] [--out benchmarks/results] [--tag NAME]

A net is a student spec and its side (``NAME@PX``; 1 channel below 64 px, 3 from 64). Writes
``train_speed[-TAG].json`` and ``.md``, the CPU and whether it has native bf16 named in both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from edgepc.files import write_text
from edgepc.hardware import cpu_has_bf16, cpu_name
from edgepc.models.specs import model_from_spec

NETS = ["tiny_cnn@28", "mobilenetv2_0.5@28", "mobilenetv2_0.5@96",
        "torchvision:mobilenet_v3_small@96", "resnet18@96"]  # fmt: skip
VARIANTS = {  # name -> (channels_last, bf16)
    "fp32": (False, False),
    "channels_last": (True, False),
    "channels_last + bf16": (True, True),
}


def step_fn(
    spec: str, side: int, batch: int, channels_last: bool, bf16: bool
) -> Callable[[], None]:
    """One training step of ``spec`` on a fixed random batch, as a function."""
    torch.manual_seed(0)
    channels = 1 if side < 64 else 3
    model = model_from_spec(spec, 10, channels, side)[0].train()
    x = torch.randn(batch, channels, side, side)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits, _ = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(net: str, batch: int, steps: int, block: int) -> dict[str, float]:
    """Images per second per variant (median over turns of ``block`` steps)."""
    spec, side = net.rsplit("@", 1)
    fns = {name: step_fn(spec, int(side), batch, *flags) for name, flags in VARIANTS.items()}
    for fn in fns.values():  # warm-up: oneDNN primitives, allocator
        fn(), fn()
    turns: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, steps // block)):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(block):
                fn()
            turns[name].append(block * batch / (time.perf_counter() - start))
    return {name: sorted(rates)[len(rates) // 2] for name, rates in turns.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", default=NETS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    rows = {net: measure(net, args.batch, args.steps, args.block) for net in args.nets}
    meta = {
        "cpu": cpu_name(),
        "native_bf16": cpu_has_bf16(),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": "python benchmarks/train_speed.py " + " ".join(argv or sys.argv[1:]),
    }
    lines = [
        "# Training speed on the CPU: img/s of one training step",
        "",
        f"{meta['cpu']} ({'native bf16' if meta['native_bf16'] else 'no native bf16'}), "
        f"{meta['threads']} threads, batch {args.batch}, median of turns of {args.block} steps "
        f"interleaved across variants; {meta['date']}.",
        f"Reproduce: `{meta['command']}`",
        "",
        "| network | " + " | ".join(VARIANTS) + " | best vs fp32 |",
        "|---|" + "---|" * (len(VARIANTS) + 1),
    ]
    for net, rates in rows.items():
        best = max(rates, key=rates.get)
        cells = [f"{rates[name]:.0f}" for name in VARIANTS]
        lines.append(f"| {net} | " + " | ".join(cells)
                     + f" | {best}: {rates[best] / rates['fp32']:.2f}× |")  # fmt: skip
    stem = "train_speed" + (f"-{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_text(args.out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
