"""Peak memory of the data, teacher and distill stages on an image folder of N and of 2N
images, streamed from disk (the default for `imagefolder`): the larger run should need no more
than 1.2x the memory of the smaller.

    python benchmarks/stream_memory.py                        # N = 20,000 at 96 px, 2 cores: ~1 h
    python benchmarks/stream_memory.py --n 1000 --size 64 --out /tmp/look   # a quick look
    python benchmarks/stream_memory.py ... distill.train.epochs=2          # key=value: the stages'

The folders are Fashion-MNIST written as RGB PNGs (the first N or 2N training images, the first
--test test images), under --work, written once; the stages' cache there is emptied first. Each
stage runs in a process of its own (the stages before it cached); its peak RSS is the process's
VmHWM (not getrusage's ru_maxrss, which in a child that subprocess starts also holds this
script's own peak at the exec: writing the 2N folder once read as a 2.6x "growth" of the data
stage). The decoding workers' peak is given beside it. The teacher is the pretrained
EfficientNet-Lite0 fine-tuned for --teacher-epochs (0: its new head untrained, the stage is
then its pass over every image and the memory-mapped cache of its outputs; the training loop's
memory is the distill row's, the same trainer), the student a MobileNetV2-0.5 distilled with PC
for one epoch. Writes stream_memory.{json,md} to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from edgepc.data import load_dataset
from edgepc.data.datasets import first_images, write_image_folder
from edgepc.files import write_text

STAGES = ("data", "teacher", "distill")
BOUND = 1.2
MEASURE = """
import json, resource, sys
from edgepc.pipelines.run import main
code = main(sys.argv[1:])
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("PEAK " + json.dumps({"code": code, "rss_mb": int(status["VmHWM"].split()[0]) / 1024,
      "workers_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def write_folder(root: Path, n: int, size: int, test: int = 2000) -> Path:
    """The first ``n`` Fashion-MNIST training images (and ``test`` test images) as a folder of
    ``size``-px RGB PNGs, written once."""
    if root.exists():
        return root
    part = first_images(load_dataset("fashion-mnist"), n, test, size, 3)
    return write_image_folder(part, root, lambda items: tqdm(items, desc=f"writing {root.name}"))


def overrides(folder: Path, teacher_epochs: int) -> list[str]:
    return [
        "data.dataset=imagefolder", f"data.root={folder}", "data.val_fraction=0.05",
        "teacher.model=efficientnet_lite0",
        f"teacher.train={{epochs: {teacher_epochs}, batch_size: 64, lr: 0.001, augment: false}}",
        "distill.student=mobilenetv2_0.5",
        "distill.train={epochs: 1, batch_size: 128, lr: 0.002, alpha: 1.0, beta: 1.0}",
    ]  # fmt: skip


def measure(stage: str, cache: Path, settings: list[str], env: dict[str, str]) -> dict[str, float]:
    """One stage in a process of its own (the stages before it cached): its peak RSS."""
    command = [sys.executable, "-c", MEASURE, "cpu", "--until", stage, "--cache", str(cache),
               "--no-progress", *settings]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    peak = [line for line in done.stdout.splitlines() if line.startswith("PEAK ")]
    if done.returncode != 0 or not peak or json.loads(peak[-1][5:])["code"] != 0:
        raise SystemExit(f"{stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(peak[-1][5:]) | {"seconds": time.perf_counter() - started}


def report(result: dict) -> str:
    n = result["n"]
    lines = [
        "# Peak memory of the first stages: N and 2N streamed images",
        "",
        f"{result['when']} · {result['machine']} · `{result['command']}`",
        "",
        f"Image folders of {n:,} and {2 * n:,} Fashion-MNIST training images as "
        f"{result['size']} px RGB PNGs (plus {result['test']:,} test images), "
        "`imagefolder` streamed from disk; EfficientNet-Lite0 teacher "
        f"(fine-tuned for {result['teacher_epochs']} epoch(s)), "
        "MobileNetV2-0.5 student (PC, 1 epoch). Each stage ran in a process of its own, the "
        "stages before it cached. Seconds depend on what else runs on the machine; RSS does not.",
        "",
        f"| stage | peak RSS, N (MB) | peak RSS, 2N (MB) | 2N / N | ≤ {BOUND} | decoding workers, "
        "N / 2N (MB) | seconds, N / 2N |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        small, large = result["runs"][str(n)][stage], result["runs"][str(2 * n)][stage]
        ratio = large["rss_mb"] / small["rss_mb"]
        lines.append(
            f"| {stage} | {small['rss_mb']:.0f} | {large['rss_mb']:.0f} | {ratio:.3f} | "
            f"{'yes' if ratio <= BOUND else '**no**'} | {small['workers_rss_mb']:.0f} / "
            f"{large['workers_rss_mb']:.0f} | {small['seconds']:.0f} / {large['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="the smaller folder's images")
    parser.add_argument("--size", type=int, default=96, help="image side in px")
    parser.add_argument("--test", type=int, default=2000, help="test images in each folder")
    parser.add_argument("--teacher-epochs", type=int, default=1, help="fine-tuning (0: none)")
    parser.add_argument("overrides", nargs="*", help="key=value, after the benchmark's own")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgepc-mem")
    parser.add_argument("--out", type=Path, default=Path("benchmarks") / "results")
    args = parser.parse_args(argv)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{args.work / 'mlflow.db'}"}
    args.work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, dict[str, float]]] = {}
    for n in (args.n, 2 * args.n):
        folder = write_folder(args.work / f"fashion-{args.size}px-{n}", n, args.size, args.test)
        cache = args.work / f"cache-{args.size}px-{n}"
        shutil.rmtree(cache, ignore_errors=True)  # a cached stage would measure nothing
        settings = overrides(folder, args.teacher_epochs) + args.overrides
        runs[str(n)] = {s: measure(s, cache, settings, env) for s in STAGES}
        print(f"{n} images: " + ", ".join(f"{s} {r['rss_mb']:.0f} MB"
                                          for s, r in runs[str(n)].items()))  # fmt: skip
    command = "python benchmarks/stream_memory.py " + " ".join(argv or sys.argv[1:])
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": command.strip(), "n": args.n, "size": args.size, "test": args.test,
        "bound": BOUND, "teacher_epochs": args.teacher_epochs,
        "runs": runs,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "stream_memory.json", json.dumps(result, indent=1))
    text = report(result)
    write_text(args.out / "stream_memory.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
