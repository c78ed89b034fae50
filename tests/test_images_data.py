"""Image loaders: tiny MNIST IDX files and CIFAR-10 batches written in the standard formats, and
scikit-learn's digits with their fixed split."""

from __future__ import annotations

import gzip
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnf.data.images import (
    IMAGE_NAMES,
    ImageData,
    load_cifar10,
    load_digits,
    load_images,
    load_mnist,
)

MNIST_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """An IDX file: 0, 0, type code, ndim, big-endian int32 dimensions, then the bytes."""
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def make_mnist(folder: Path, gz_images: bool = False, gz_labels: bool = False, n=None) -> dict:
    """Write both splits (5 train and 3 test images of 28x28) and return the arrays written."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, count in (n or {"train": 5, "test": 3}).items():
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        image_name, label_name = MNIST_NAMES[split]
        write_idx(folder / image_name, images, gz_images)
        write_idx(folder / label_name, labels, gz_labels)
        written[split] = images, labels
    return written


@pytest.mark.parametrize("gz_images, gz_labels", [(False, False), (True, True), (True, False)])
def test_mnist_round_trip(tmp_path, gz_images, gz_labels):
    written = make_mnist(tmp_path, gz_images, gz_labels)
    for split, (images, labels) in written.items():
        data = load_mnist(tmp_path, split)
        assert isinstance(data, ImageData)
        assert data.images.shape == (len(images), 1, 28, 28)
        assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
        assert np.array_equal(data.images[:, 0].numpy(), images)
        assert np.array_equal(data.labels.numpy(), labels)
        assert (data.levels, data.name, len(data)) == (256, "mnist", len(images))
    # The tensors own writable memory (not the read-only file buffer).
    data.images[0, 0, 0, 0] = 7


def test_mnist_reads_torchvision_layout_and_gzip_by_content(tmp_path):
    written = make_mnist(tmp_path / "MNIST" / "raw")
    assert np.array_equal(load_mnist(tmp_path, "test").images[:, 0].numpy(), written["test"][0])

    # A gzipped file that lost its ".gz" is still read.
    folder = tmp_path / "renamed"
    written = make_mnist(folder, gz_images=True)
    for name in MNIST_NAMES["train"][:1]:
        (folder / f"{name}.gz").rename(folder / name)
    assert np.array_equal(load_mnist(folder).images[:, 0].numpy(), written["train"][0])


def test_mnist_missing_files_say_what_to_put_where(tmp_path):
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte or train-images-idx3-ubyte\.gz"):
        load_mnist(tmp_path)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte") as info:
        load_mnist(tmp_path, "test")
    message = str(info.value)
    assert str(tmp_path) in message and "download MNIST's four IDX files" in message
    assert "train-labels-idx1-ubyte" in message  # all four are named

    write_idx(tmp_path / MNIST_NAMES["train"][0], np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="expected train-labels-idx1-ubyte or"):
        load_mnist(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        load_mnist(tmp_path / "nowhere")


def test_mnist_rejects_wrong_magic_numbers(tmp_path):
    make_mnist(tmp_path)
    image_path, label_path = (tmp_path / name for name in MNIST_NAMES["train"])
    labels = np.zeros(5, np.uint8)

    # A label file where the images belong: 1 dimension, not 3.
    image_path.write_bytes(idx_bytes(labels))
    with pytest.raises(ValueError, match=r"magic number 0x00000801, expected 0x00000803") as info:
        load_mnist(tmp_path)
    assert "download MNIST's four IDX files" in str(info.value)

    # Right dimensions, wrong type code (0x0D: float32).
    write_idx(image_path, np.zeros((5, 28, 28), np.uint8))
    label_path.write_bytes(idx_bytes(labels, type_code=0x0D))
    with pytest.raises(ValueError, match=r"magic number 0x00000d01"):
        load_mnist(tmp_path)

    label_path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="magic number 0x00000000"):
        load_mnist(tmp_path)
    label_path.write_bytes(b"\x00\x00\x08\x01\x00")
    with pytest.raises(ValueError, match="has 5 bytes, fewer than its IDX header needs"):
        load_mnist(tmp_path)


def test_mnist_rejects_truncated_files(tmp_path):
    make_mnist(tmp_path, gz_images=True)
    gz_path = tmp_path / f"{MNIST_NAMES['train'][0]}.gz"
    raw = gzip.decompress(gz_path.read_bytes())

    gz_path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(ValueError, match=r"truncated or corrupt") as info:
        load_mnist(tmp_path)
    assert "5x28x28 = 3920" in str(info.value)

    gz_path.write_bytes(gzip.compress(raw + b"\x00"))  # trailing bytes are corrupt too
    with pytest.raises(ValueError, match=r"truncated or corrupt"):
        load_mnist(tmp_path)

    gz_path.write_bytes(gzip.compress(raw)[:-20])  # a cut-off download
    with pytest.raises(ValueError, match=r"cannot read .*train-images-idx3-ubyte\.gz"):
        load_mnist(tmp_path)


def test_mnist_rejects_image_label_count_mismatch(tmp_path):
    make_mnist(tmp_path)
    write_idx(tmp_path / MNIST_NAMES["train"][1], np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="has 5 images but .* has 4 labels"):
        load_mnist(tmp_path)
    with pytest.raises(ValueError, match="unknown split 'val'; choose one of: train, test"):
        load_mnist(tmp_path, "val")


def cifar_batch(n: int, rng: np.random.Generator) -> dict:
    """A batch dict as CIFAR-10 pickles it (labels a list of ints, keys bytes)."""
    return {
        b"batch_label": b"a tiny batch",
        b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"image_{i}.png".encode() for i in range(n)],
    }


def write_pickle(path: Path, obj: object, numpy_core: bool = False) -> None:
    data = pickle.dumps(obj, protocol=2)  # CIFAR-10's files are protocol-2 pickles
    if numpy_core:  # as written by numpy 1.x, like the original files
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"numpy.core.multiarray" in data
    path.write_bytes(data)


def make_cifar(root: Path, numpy_core: bool = False) -> dict:
    """Write cifar-10-batches-py with 2 images per training batch and 3 test images."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": cifar_batch(2, rng) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(3, rng)
    for name, batch in batches.items():
        write_pickle(folder / name, batch, numpy_core)
    return batches


@pytest.mark.parametrize("numpy_core", [False, True])
def test_cifar10_round_trip(tmp_path, numpy_core):
    batches = make_cifar(tmp_path, numpy_core)
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        for split, names in (("train", train_names), ("test", ["test_batch"])):
            data = load_cifar10(root, split)
            expected = np.concatenate([batches[name][b"data"] for name in names])
            labels = sum((batches[name][b"labels"] for name in names), [])
            assert data.images.shape == (len(expected), 3, 32, 32)
            assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
            assert data.labels.tolist() == labels
            assert (data.levels, data.name) == (256, "cifar10")
            # Channel-major rows: value (c, h, w) of image i is data[i, 1024 c + 32 h + w].
            images = data.images.numpy()
            assert images[1, 2, 3, 4] == expected[1, 2 * 1024 + 3 * 32 + 4]
            assert np.array_equal(images.reshape(len(expected), -1), expected)


def test_cifar10_missing_batch_names_files_and_folder(tmp_path):
    make_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="expected data_batch_3 in") as info:
        load_cifar10(tmp_path)
    message = str(info.value)
    assert str(folder) in message and "CIFAR-10's python version" in message
    assert "test_batch" in message
    assert load_cifar10(tmp_path, "test").images.shape == (3, 3, 32, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected test_batch in"):
        load_cifar10(tmp_path / "empty", "test")


def _bad_batches():
    rng = np.random.default_rng(1)
    good = cifar_batch(2, rng)
    return {
        "not a dict": ([good[b"data"]], 'expected a dict with keys b"data" and b"labels"'),
        "no labels": ({b"data": good[b"data"]}, r"got \[b'data'\]"),
        "float data": ({**good, b"data": good[b"data"].astype(np.float32)}, "2-D uint8"),
        "flat data": ({**good, b"data": good[b"data"].ravel()}, "2-D uint8"),
        "wrong width": ({**good, b"data": good[b"data"][:, :1024]}, "3072 columns"),
        "short labels": ({**good, b"labels": [1]}, "one integer per image"),
        "text labels": ({**good, b"labels": [b"cat", b"dog"]}, "one integer per image"),
        "label 10": ({**good, b"labels": [3, 10]}, r"labels must be in 0\.\.9"),
    }


@pytest.mark.parametrize("case", list(_bad_batches()))
def test_cifar10_rejects_bad_pickle_content(tmp_path, case):
    make_cifar(tmp_path)
    batch, reason = _bad_batches()[case]
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_pickle(path, batch)
    with pytest.raises(ValueError, match="is not a CIFAR-10 batch") as info:
        load_cifar10(tmp_path, "test")
    assert info.match(reason) and info.match("CIFAR-10's python version")


class _RunsCode:
    def __reduce__(self):
        return os.getcwd, ()


def test_cifar10_refuses_pickles_that_call_functions_and_corrupt_pickles(tmp_path):
    make_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_pickle(path, {b"data": _RunsCode(), b"labels": []})
    with pytest.raises(ValueError, match=r"cannot unpickle .*refusing to load \w+\.getcwd"):
        load_cifar10(tmp_path, "test")

    good = pickle.dumps(cifar_batch(3, np.random.default_rng(0)), protocol=2)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="cannot unpickle .*test_batch"):
        load_cifar10(tmp_path, "test")


def test_load_images_dispatches_and_validates(tmp_path):
    make_mnist(tmp_path / "mnist")
    make_cifar(tmp_path / "cifar")
    assert IMAGE_NAMES == ("digits", "mnist", "cifar10")
    assert load_images("mnist", tmp_path / "mnist", "test").images.shape == (3, 1, 28, 28)
    assert load_images("cifar10", str(tmp_path / "cifar")).images.shape == (10, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown image data set 'svhn'; .*digits, mnist, cifar10"):
        load_images("svhn")
    with pytest.raises(ValueError, match="pass root"):
        load_images("mnist")
    with pytest.raises(ValueError, match="seed applies to digits only"):
        load_images("cifar10", tmp_path / "cifar", seed=1)
    with pytest.raises(ValueError, match="pass no root"):
        load_images("digits", tmp_path)


def test_image_data_checks_its_fields():
    labels = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="uint8 tensor of shape"):
        ImageData(torch.zeros(2, 1, 8, 8), labels, 17, "digits")
    with pytest.raises(ValueError, match="labels must have shape"):
        ImageData(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), labels, 17, "digits")


def test_digits_without_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits()


@pytest.fixture(scope="module")
def digits() -> dict[str, ImageData]:
    pytest.importorskip("sklearn")
    return {split: load_digits(split) for split in ("train", "val", "test", "all")}


def test_digits_shapes_levels_and_split_sizes(digits):
    sizes = {split: len(data) for split, data in digits.items()}
    assert sizes == {"train": 1300, "val": 200, "test": 297, "all": 1797}
    for data in digits.values():
        assert data.images.shape == (len(data), 1, 8, 8) and data.images.dtype == torch.uint8
        assert data.labels.shape == (len(data),) and data.labels.dtype == torch.int64
        assert (data.levels, data.name) == (17, "digits")
    everything = digits["all"]
    assert int(everything.images.min()) == 0 and int(everything.images.max()) == 16
    assert len(torch.unique(everything.images)) == 17
    assert sorted(torch.unique(everything.labels).tolist()) == list(range(10))


def _rows(data: ImageData) -> list[bytes]:
    """One sortable record (label and pixels) per image."""
    pixels = data.images.reshape(len(data), -1).numpy()
    return sorted(bytes([label]) + row.tobytes() for label, row in zip(data.labels, pixels))


def test_digits_split_is_a_disjoint_partition(digits):
    # As multisets (the digits hold a few duplicate images), train + val + test == all.
    parts = _rows(digits["train"]) + _rows(digits["val"]) + _rows(digits["test"])
    assert sorted(parts) == _rows(digits["all"])


def test_digits_split_is_fixed_and_ignores_global_random_state(digits):
    # The legacy global numpy state is the one a user's script may have seeded (restored after).
    state = np.random.get_state()  # noqa: NPY002
    torch.manual_seed(123)
    np.random.seed(123)  # noqa: NPY002
    try:
        again = load_images("digits", split="train")
    finally:
        np.random.set_state(state)  # noqa: NPY002
    assert torch.equal(again.images, digits["train"].images)
    assert torch.equal(again.labels, digits["train"].labels)
    # The documented permutation: train starts with images 410, 821, 1264 of scikit-learn's
    # order and test with 1208, 505; a change here changes every published digits number.
    assert torch.equal(digits["train"].images[:3], digits["all"].images[[410, 821, 1264]])
    assert torch.equal(digits["test"].images[:2], digits["all"].images[[1208, 505]])

    other = load_digits("test", seed=1)
    assert not torch.equal(other.images, digits["test"].images)
    assert torch.equal(load_images("digits", split="test", seed=1).images, other.images)


def test_digits_rejects_bad_split_and_seed():
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError, match="unknown split 'valid'; choose one of: train, val"):
        load_digits("valid")
    for seed in (-1, 1.5, True, 2**64):
        with pytest.raises(ValueError, match="seed must be an int"):
            load_digits(seed=seed)
