"""Bad input to the data loaders: damaged or misplaced files and bad arguments give a
``ValueError`` that names the file and what to do (the per-format tests are in
``test_images_data.py``; these are the relatives a user meets first), and zero points give
empty results, as a model's ``sample(0)`` does."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from test_images_data import MNIST_NAMES, idx_bytes, make_mnist

from cnf.data import (
    NAMES,
    load_cifar10,
    load_digits,
    load_images,
    load_mnist,
    sample,
    sample_tensor,
    toy_sampler,
)

pytestmark = pytest.mark.deadline(30)

IMAGES, LABELS = MNIST_NAMES["train"]


def _empty_file(folder: Path) -> None:
    (folder / IMAGES).write_bytes(b"")


def _folder_in_place_of_a_file(folder: Path) -> None:
    (folder / IMAGES).unlink()
    (folder / IMAGES).mkdir()


def _no_images(folder: Path) -> None:
    (folder / IMAGES).write_bytes(idx_bytes(np.zeros((0, 28, 28), np.uint8)))
    (folder / LABELS).write_bytes(idx_bytes(np.zeros(0, np.uint8)))


def _not_gzip_inside(folder: Path) -> None:
    (folder / IMAGES).write_bytes(b"\x1f\x8b" + b"not really gzip")


def _truncated_gzip(folder: Path) -> None:
    data = gzip.compress((folder / IMAGES).read_bytes())
    (folder / IMAGES).write_bytes(data[: len(data) // 2])


def _header_only(folder: Path) -> None:
    (folder / IMAGES).write_bytes((folder / IMAGES).read_bytes()[:16])


def _labels_for_another_split(folder: Path) -> None:
    (folder / LABELS).write_bytes(idx_bytes(np.zeros(4, np.uint8)))


def _images_as_labels(folder: Path) -> None:
    (folder / LABELS).write_bytes((folder / IMAGES).read_bytes())


@pytest.mark.parametrize(
    ("damage", "phrase"),
    [
        (_empty_file, "is empty .0 bytes.: an interrupted download"),
        (_folder_in_place_of_a_file, f"expected {IMAGES} or {IMAGES}.gz"),
        (_no_images, "holds no entries"),
        (_not_gzip_inside, "cannot read"),
        (_truncated_gzip, "cannot read"),
        (_header_only, "header promises 5x28x28"),
        (_labels_for_another_split, "5 images but .* 4 labels"),
        (_images_as_labels, "not an IDX file of unsigned bytes with 1 dimensions"),
    ],
)
def test_damaged_mnist_files(tmp_path, damage, phrase):
    make_mnist(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=phrase) as info:
        load_mnist(tmp_path)
    assert "download MNIST's four IDX files" in str(info.value)  # and what to do


@pytest.mark.parametrize("loader", [load_mnist, load_cifar10])
def test_a_root_that_is_a_file_or_missing(tmp_path, loader):
    (tmp_path / "file").write_text("x")
    for root in (tmp_path / "file", tmp_path / "missing"):
        with pytest.raises(ValueError, match="is not a folder"):
            loader(root)


def test_cifar_batches_that_are_not_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"")
    with pytest.raises(ValueError, match="cannot unpickle .*data_batch_1"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize(
    ("call", "phrase"),
    [
        (lambda: load_images("svhn"), "unknown image data set 'svhn'"),
        (lambda: load_images("mnist"), "pass root"),
        (lambda: load_images("digits", root="."), "pass no root"),
        (lambda: load_mnist(".", split="val"), "unknown split 'val'"),
        (lambda: load_digits("validation"), "unknown split 'validation'"),
        (lambda: load_digits(seed=-1), "seed must be an int"),
        (lambda: sample("moons2", 10), "unknown toy data set 'moons2'"),
        (lambda: sample("moons", -1), "an int >= 0"),
        (lambda: sample("moons", 2.5), "an int >= 0"),
        (lambda: sample_tensor("moons", True), "an int >= 0"),
        (lambda: toy_sampler("nope"), "unknown toy data set"),
    ],
)
def test_bad_loader_arguments(call, phrase):
    with pytest.raises(ValueError, match=phrase):
        call()


@pytest.mark.parametrize("name", NAMES)
def test_zero_toy_points_are_empty(name):
    assert sample(name, 0).shape == (0, 2)
    assert sample_tensor(name, 0).shape == (0, 2)
    assert toy_sampler(name)(0, torch.Generator().manual_seed(0)).shape == (0, 2)
