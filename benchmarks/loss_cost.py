"""Forward+backward time and peak memory of the transfer losses, by batch size.

    python benchmarks/loss_cost.py            # full: B = 64 … 1024 (2048 for pc), CPU (+ CUDA)
    python benchmarks/loss_cost.py --quick    # B = 64, 128, 256: about a minute on 2 cores
    python benchmarks/loss_cost.py --sizes 32 --losses pc kd   # chosen points only

Each time is the median of several runs in this process; each memory figure is measured (the
process's peak RSS on CPU, torch.cuda.max_memory_allocated on CUDA) above the level before the
call. Writes benchmarks/results/loss_cost[_cuda].json and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from tqdm import tqdm

from edgepc import __version__
from edgepc.coherence import (
    PerceptionCoherenceLoss,
    perception_coherence_loss,
    perception_coherence_loss_reference,
)
from edgepc.distill.losses import build_loss
from edgepc.distill.losses.dist import dist_loss
from edgepc.distill.losses.kd import kd_loss
from edgepc.distill.losses.pkt import pkt_loss
from edgepc.distill.losses.rkd_angle import rkd_angle_loss
from edgepc.distill.losses.rkd_distance import rkd_distance_loss
from edgepc.distill.losses.sp import sp_loss
from edgepc.files import write_text
from edgepc.measure import median_seconds, peak_memory, peak_memory_in_fresh_process

DIM_TEACHER, DIM_STUDENT = 512, 128
CLASSES = 10  # the logit-based losses (kd, dist) read the first CLASSES columns as logits
_FITNET = build_loss("fitnet", student_dim=DIM_STUDENT, teacher_dim=DIM_TEACHER)
# CRD with its published defaults over a CIFAR-sized training set (its memory bank's size).
_CRD = build_loss("crd", student_dim=DIM_STUDENT, teacher_dim=DIM_TEACHER, n_data=50_000)


def _full_queue(m: int) -> PerceptionCoherenceLoss:
    """PC with a queue of ``m`` references, already full (as after m / B training steps)."""
    loss = PerceptionCoherenceLoss(queue=m, student_dim=DIM_STUDENT, teacher_dim=DIM_TEACHER)
    gen = torch.Generator().manual_seed(m)
    loss.queued_student.copy_(torch.randn(m, DIM_STUDENT, generator=gen))
    loss.queued_teacher.copy_(torch.randn(m, DIM_TEACHER, generator=gen))
    loss.queued.fill_(m)
    return loss


_PC_QUEUE = _full_queue(1024)
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "pc": perception_coherence_loss,
    "pc_q1024": lambda s, t: _PC_QUEUE.to(s.device)(s, t),
    "pc_reference": perception_coherence_loss_reference,
    "rkd_angle": rkd_angle_loss,
    "rkd_distance": rkd_distance_loss,
    "pkt": pkt_loss,
    "sp": sp_loss,
    "fitnet": lambda s, t: _FITNET.to(s.device)(s, t),
    "crd": lambda s, t: _CRD.to(s.device)(s, t, torch.arange(len(s), device=s.device)),
    "kd": lambda s, t: kd_loss(s[:, :CLASSES], t[:, :CLASSES]),
    "dist": lambda s, t: dist_loss(s[:, :CLASSES], t[:, :CLASSES]),
}
# Bytes per B³ that the O(B³)-memory losses hold at their peak (measured, rounded up):
# a point is skipped, not attempted, when it would not fit in the memory available.
CUBIC_BYTES = {"pc_reference": 9, "rkd_angle": 17}
RESULTS = Path(__file__).parent / "results"


@dataclass
class Point:
    loss: str
    batch: int
    seconds: float | None = None
    peak_mib: float | None = None
    skipped: str | None = None


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can use now on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def prepared_step(name: str, batch: int, device: str) -> Callable[[], None]:
    """Seeded inputs for one point and the forward + backward to measure on them."""
    gen = torch.Generator().manual_seed(batch)
    student = torch.randn(batch, DIM_STUDENT, generator=gen).to(device).requires_grad_()
    teacher = torch.randn(batch, DIM_TEACHER, generator=gen).to(device)

    def step() -> None:
        student.grad = None
        LOSSES[name](student, teacher).backward()

    return step


def skip_reason(name: str, batch: int, device: torch.device) -> str | None:
    need = CUBIC_BYTES.get(name, 0) * batch**3
    free = available_bytes(device)
    return (
        f"needs ~{need / 2**30:.0f} of {free / 2**30:.0f} GiB free" if need > 0.7 * free else None
    )


def measure(points: list[Point], device: torch.device, repeats: int) -> None:
    """Fill in every point: the median time, then the peak memory of one more step (on CPU in
    a fresh process, where the RSS peak is exact)."""
    for p in (bar := tqdm(points, desc=f"loss cost ({device.type})", unit="pt")):
        bar.set_postfix_str(f"{p.loss} B={p.batch}")
        p.skipped = skip_reason(p.loss, p.batch, device)
        if p.skipped:
            continue
        runs = repeats if p.batch < 1024 else min(repeats, 3)
        thunk = prepared_step(p.loss, p.batch, device.type)
        p.seconds = median_seconds(thunk, runs, warmup=1, device=device)
        if device.type == "cuda":  # the CUDA allocator's own peak is exact in-process
            with peak_memory(device) as peak:
                thunk()
            p.peak_mib = peak.bytes / 2**20
            continue
        del thunk  # frees the inputs before the probe process allocates its own
        args = (p.loss, p.batch, device.type)
        peak_bytes, _ = peak_memory_in_fresh_process(prepared_step, args, device.type)
        p.peak_mib = peak_bytes / 2**20


def plan(
    quick: bool, sizes: list[int] | None = None, losses: list[str] | None = None
) -> list[Point]:
    """The points to measure, in order: every loss (or ``losses``) at every batch size (or
    ``sizes``), and pc at 2048 in the full plan."""
    chosen = sizes or ([64, 128, 256] if quick else [64, 128, 256, 512, 1024])
    points = [Point(name, b) for b in chosen for name in losses or LOSSES]
    full = not (quick or sizes or losses)
    return [*points, Point("pc", 2048)] if full else points


def lookup(points: list[Point], loss: str, batch: int) -> Point | None:
    return next((p for p in points if p.loss == loss and p.batch == batch), None)


def targets(points: list[Point]) -> list[dict[str, object]]:
    """The issue's targets as ratios measured in this run, for the points this run planned."""

    def ratio(field: str, loss: str, other: str, batch: int) -> float | None:
        a, b = lookup(points, loss, batch), lookup(points, other, batch)
        x, y = getattr(a, field), getattr(b, field)
        return None if x is None or not y else x / y

    checks = [
        ("pc peak memory / reference at B=1024", "peak_mib", "pc_reference", 1024, 0.125),
        ("pc time / reference at B=1024", "seconds", "pc_reference", 1024, 1.5),
        ("pc time / rkd_angle at B=256", "seconds", "rkd_angle", 256, 1.0),
    ]
    rows: list[dict[str, object]] = []
    for label, field, other, batch, limit in checks:
        if lookup(points, "pc", batch) and lookup(points, other, batch):
            value = ratio(field, "pc", other, batch)
            met = value is not None and value <= limit
            rows.append({"target": label, "limit": f"<= {limit}", "value": value, "met": met})
    if big := lookup(points, "pc", 2048):
        rows.append(
            {
                "target": "pc runs at B=2048 (s)",
                "limit": "runs",
                "value": big.seconds,
                "met": big.seconds is not None,
            }
        )
    return rows


def markdown(report: dict) -> str:
    points = [Point(**p) for p in report["points"]]
    sizes = sorted({p.batch for p in points})
    lines = [
        f"# Loss cost on {report['device_name']}",
        "",
        f"{report['when']} · torch {report['torch']} · {report['threads']} threads · "
        f"d_S = {DIM_STUDENT}, d_T = {DIM_TEACHER} · median of {report['repeats']} runs · "
        f"`{report['command']}`",
        "",
        "Forward + backward: milliseconds / peak extra MiB.",
        "",
        "| loss | " + " | ".join(f"B={b}" for b in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name in dict.fromkeys(p.loss for p in points):  # the measured losses, in order
        cells = []
        for b in sizes:
            p = lookup(points, name, b)
            if p is None:
                cells.append("")
            elif p.skipped:
                cells.append(f"skipped ({p.skipped})")
            else:
                cells.append(f"{1000 * p.seconds:.1f} ms / {p.peak_mib:.0f} MiB")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| target | limit | measured | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"| {t['target']} | {t['limit']} | {value} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def run(
    device: torch.device,
    quick: bool,
    repeats: int,
    out_dir: Path,
    sizes: list[int] | None = None,
    losses: list[str] | None = None,
    name: str | None = None,
) -> dict:
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    points = plan(quick, sizes, losses)
    measure(points, device, repeats)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "edgepc": __version__,
        "torch": torch.__version__,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()}",
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "quick": quick,
        "points": [asdict(p) for p in points],
    }
    report["targets"] = targets(points)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    stem = f"loss_cost{suffix}" + ("_quick" if quick else "_custom" if sizes or losses else "")
    stem = f"{name}{suffix}" if name else stem
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text((out_dir / f"{stem}.json"), json.dumps(report, indent=2) + "\n")
    write_text((out_dir / f"{stem}.md"), markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B = 64, 128, 256 only")
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: CPU, then CUDA too when present",
    )
    parser.add_argument("--sizes", type=int, nargs="+", help="batch sizes (instead of the plan)")
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), help="only these losses")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per point (median)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for JSON and markdown")
    parser.add_argument("--name", help="file name stem (default: loss_cost[_cuda][_quick|_custom])")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="re-score and re-render a saved report's markdown; measure nothing",
    )
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        report["targets"] = targets([Point(**p) for p in report["points"]])
        write_text(args.render, json.dumps(report, indent=2) + "\n")
        write_text(args.render.with_suffix(".md"), markdown(report))
        print(markdown(report))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    for name in devices:
        if name == "cuda" and not torch.cuda.is_available():
            continue
        report = run(torch.device(name), args.quick, args.repeats, args.out, args.sizes,
                     args.losses, args.name)  # fmt: skip
        print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
