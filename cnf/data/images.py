r"""Image data sets for density estimation, as integer grey (or colour) levels.

Three data sets, all returned as an :class:`ImageData` of ``uint8`` levels in ``[0, levels)``,
not dequantized (dequantization and rescaling are separate, invertible steps):

=========  ==================  ======  =====================================================
name       shape               levels  source
=========  ==================  ======  =====================================================
digits     ``(n, 1, 8, 8)``    17      scikit-learn's bundled 8x8 digits (1797 images); needs
                                       the optional scikit-learn (``pip install scikit-learn``)
mnist      ``(n, 1, 28, 28)``  256     a local folder of MNIST's four IDX files
cifar10    ``(n, 3, 32, 32)``  256     a local folder of CIFAR-10's python batches
=========  ==================  ======  =====================================================

Nothing is downloaded at run time. A missing or malformed file raises a :class:`ValueError`
that names the files expected and the folder to put them in.

The digits split is fixed: a permutation of the 1797 indices of scikit-learn's order, determined
by ``seed`` alone (0 by default), puts its first 1500 images in the training pool and its last
297 in the test set; the pool's first 1300 are ``"train"`` and its last 200 ``"val"``, held out
for early stopping (see :func:`load_digits` for how the permutation is computed).

Example:
    >>> data = load_images("digits", split="test")  # doctest: +SKIP
    >>> data.images.shape, data.images.dtype, data.levels  # doctest: +SKIP
    (torch.Size([297, 1, 8, 8]), torch.uint8, 17)
"""

from __future__ import annotations

import codecs
import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .optional import sklearn_datasets

__all__ = ["IMAGE_NAMES", "ImageData", "load_cifar10", "load_digits", "load_images", "load_mnist"]

IMAGE_NAMES: tuple[str, ...] = ("digits", "mnist", "cifar10")
"""Names accepted by :func:`load_images`."""

_DIGITS_COUNT = 1797
_DIGITS_LEVELS = 17  # each pixel counts the set bits of a 4x4 block: 0..16
_DIGITS_SPLITS = {"train": slice(0, 1300), "val": slice(1300, 1500), "test": slice(1500, None)}

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one MNIST uses

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR_IMAGE_SHAPE = (3, 32, 32)  # each row of b"data": 1024 red, then green, then blue, row-major
_CIFAR_CLASSES = 10


@dataclass(frozen=True)
class ImageData:
    """Images as integer levels, with their labels.

    Attributes:
        images: levels of shape ``(n, C, H, W)``, ``uint8`` with values in ``[0, levels)``
            (``uint8`` rather than ``int64``: CIFAR-10's training set takes 150 MB, not 1.2 GB).
        labels: class labels of shape ``(n,)``, ``int64``.
        levels: the number of levels a pixel can take: 17 for digits, 256 for MNIST and
            CIFAR-10. Dequantized data lie in ``[0, levels)``.
        name: the data set, one of :data:`IMAGE_NAMES`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    levels: int
    name: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"images must be a uint8 tensor of shape (n, C, H, W), got dtype "
                f"{self.images.dtype} and shape {tuple(self.images.shape)}"
            )
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must have shape (n,) with n = {len(self.images)} images, "
                f"got shape {tuple(self.labels.shape)}"
            )
        if not 2 <= self.levels <= 256:
            raise ValueError(f"levels must be in [2, 256] for uint8 images, got {self.levels}")

    def __len__(self) -> int:
        return len(self.images)


def _check_split(split: str, choices: tuple[str, ...] | list[str]) -> None:
    if split not in choices:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(choices)}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")


# SplitMix64's constants (Steele, Lea and Flood, 2014).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _permutation(n: int, seed: int) -> np.ndarray:
    """The permutation of ``range(n)`` that sorts SplitMix64's outputs for ``seed``.

    Written out rather than drawn from numpy's generators, whose streams numpy does not
    promise to keep across versions, so the split is the same everywhere. SplitMix64's mix is a
    bijection of 64-bit integers and its inputs are distinct, so there are no ties.
    """
    # Array arithmetic wraps modulo 2**64 silently (numpy scalars would warn on overflow).
    z = np.uint64(seed) + np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return np.argsort(z, kind="stable")


def load_digits(split: str = "train", *, seed: int = 0) -> ImageData:
    r"""scikit-learn's 8x8 handwritten digits, with a fixed train/val/test split.

    The 1797 images of the UCI optical recognition data set (its test part, as bundled with
    scikit-learn); each pixel counts the set pixels of a 4x4 block of a 32x32 bitmap, so it takes
    17 levels, 0 to 16.

    The split depends on ``seed`` only, never on torch's or numpy's global random state. Let
    :math:`h_i` be SplitMix64's output for state ``seed`` after :math:`i + 1` steps,
    :math:`i = 0, \dots, 1796` (scikit-learn's order), and :math:`\pi` the indices sorted by
    :math:`h_i`. Then ``"train"`` is :math:`\pi_{0:1300}`, ``"val"`` :math:`\pi_{1300:1500}`
    and ``"test"`` :math:`\pi_{1500:1797}`, each in that order; ``"all"`` is every image in
    scikit-learn's order.

    Args:
        split: ``"train"`` (1300 images), ``"val"`` (200), ``"test"`` (297) or ``"all"``
            (1797).
        seed: the split's seed, not a training seed; keep the default 0 to compare results.

    Returns:
        :class:`ImageData` with images of shape ``(n, 1, 8, 8)`` in ``0..16`` and
        ``levels = 17``.

    Raises:
        ImportError: if scikit-learn is not installed.
        ValueError: for an unknown split or a seed that is not an int in ``[0, 2**64)``.

    Example:
        >>> train, val = load_digits("train"), load_digits("val")  # doctest: +SKIP
        >>> len(train), len(val), int(train.images.max()) + 1  # doctest: +SKIP
        (1300, 200, 17)
    """
    _check_split(split, [*_DIGITS_SPLITS, "all"])
    _check_seed(seed)
    bunch = sklearn_datasets("digits").load_digits()
    images = np.asarray(bunch.images)
    if images.shape != (_DIGITS_COUNT, 8, 8) or images.min() < 0 or images.max() > 16:
        raise ValueError(
            f"scikit-learn's digits are not the expected 1797 8x8 images in 0..16 (got shape "
            f"{images.shape}); this loader does not know this scikit-learn version's data"
        )
    images = images.astype(np.uint8)[:, None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    if split != "all":
        index = _permutation(_DIGITS_COUNT, int(seed))[_DIGITS_SPLITS[split]]
        images, labels = images[index], labels[index]
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), _DIGITS_LEVELS, "digits")


def _as_folder(root: str | os.PathLike[str], what: str) -> Path:
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; {what}")
    return folder


def _mnist_help(folder: Path) -> str:
    names = ", ".join(name for pair in _MNIST_FILES.values() for name in pair)
    return (
        f"download MNIST's four IDX files ({names}) and put them, gzipped (.gz) or not, in {folder}"
    )


def _find_idx(folder: Path, name: str) -> Path:
    # torchvision keeps the same files in root/MNIST/raw; accept that layout too.
    for directory in (folder, folder / "MNIST" / "raw"):
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise ValueError(f"expected {name} or {name}.gz in {folder}; {_mnist_help(folder)}")


def _read_idx(path: Path, ndim: int, help_text: str) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with ``ndim`` dimensions, gzipped or not.

    IDX: two zero bytes, the type code (0x08 for unsigned bytes), the number of dimensions,
    then each dimension as a big-endian int32, then the data in C order.
    """
    try:
        data = path.read_bytes()
        # Decide by content, not by name: some downloads are unpacked but keep ".gz".
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:  # bad gzip: OSError; truncated gzip: EOF
        raise ValueError(f"cannot read {path} ({err}); {help_text}") from err

    if not data:
        raise ValueError(f"{path} is empty (0 bytes): an interrupted download? {help_text}")
    magic = int.from_bytes(data[:4], "big")
    expected = (_IDX_UBYTE << 8) | ndim
    if magic != expected:
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes with {ndim} dimensions: magic number "
            f"0x{magic:08x}, expected 0x{expected:08x}; {help_text}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{path} has {len(data)} bytes, fewer than its IDX header needs; {help_text}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    if min(shape) < 0:
        raise ValueError(f"{path} has negative dimensions {shape} in its header; {help_text}")
    if shape[0] == 0:
        raise ValueError(f"{path} holds no entries (its header says 0); {help_text}")
    size = math.prod(shape)
    if len(data) != header + size:
        raise ValueError(
            f"{path} has {len(data) - header} bytes of data but its header promises "
            f"{'x'.join(map(str, shape))} = {size} (truncated or corrupt); {help_text}"
        )
    # Copy: a tensor made from the read-only buffer would share memory torch may not write.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def load_mnist(root: str | os.PathLike[str], split: str = "train") -> ImageData:
    """MNIST from a local folder of its four IDX files.

    ``root`` holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``) or not, as
    published with MNIST (or in ``root/MNIST/raw``, torchvision's layout). Only the two files of
    the split asked for are read. The IDX header is checked (magic number, dimensions, file
    size) and the image and label counts must agree.

    Args:
        root: the folder with the IDX files.
        split: ``"train"`` (60000 images) or ``"test"`` (10000).

    Returns:
        :class:`ImageData` with images of shape ``(n, 1, 28, 28)`` (rows and columns as the
        file's header gives them) and ``levels = 256``.

    Raises:
        ValueError: for an unknown split, or a missing, unreadable or malformed file; the
            message names the files expected and the folder to put them in.
    """
    _check_split(split, tuple(_MNIST_FILES))
    folder = _as_folder(root, _mnist_help(Path(root)))
    help_text = _mnist_help(folder)
    image_path, label_path = (_find_idx(folder, name) for name in _MNIST_FILES[split])
    images = _read_idx(image_path, 3, help_text)
    labels = _read_idx(label_path, 1, help_text)
    if len(images) != len(labels):
        raise ValueError(
            f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels; "
            f"the two files must come from the same split. {help_text}"
        )
    return ImageData(
        torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64)), 256, "mnist"
    )


def _cifar_help(folder: Path) -> str:
    names = ", ".join([*_CIFAR_FILES["train"], *_CIFAR_FILES["test"]])
    return (
        f"download CIFAR-10's python version, unpack it, and pass the {_CIFAR_FOLDER} folder "
        f"(holding {names}) or its parent as root (looked in {folder})"
    )


try:
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, bytes and numbers, and refuses everything else.

    A pickle can call any importable function while it loads; this one resolves only what
    numpy arrays need, so a tampered file fails instead of running code. The original files,
    written by numpy 1.x, name ``numpy.core``; ``_codecs.encode`` is how Python 3 pickles bytes
    at protocol 2.
    """

    _GLOBALS = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays, "
                f"lists and bytes"
            ) from None


def _read_cifar_batch(path: Path, help_text: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, 3, 32, 32)`` uint8 and labels ``(n,)`` int64 of one validated batch file."""
    try:
        with path.open("rb") as file:
            batch = _BatchUnpickler(file, encoding="bytes").load()
    except Exception as err:  # a corrupt pickle can fail in many ways (EOF, index, type, ...)
        raise ValueError(f"cannot unpickle {path} ({err}); {help_text}") from err

    def malformed(reason: str) -> ValueError:
        return ValueError(f"{path} is not a CIFAR-10 batch: {reason}; {help_text}")

    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise malformed(f'expected a dict with keys b"data" and b"labels", got {keys}')
    data, labels = batch[b"data"], batch[b"labels"]
    width = int(np.prod(_CIFAR_IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise malformed(f'b"data" must be a 2-D uint8 array, got {_describe(data)}')
    if data.shape[1] != width:
        raise malformed(f'b"data" must have {width} columns (3x32x32), got shape {data.shape}')
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        raise malformed(
            f'b"labels" must hold one integer per image ({len(data)}), got {_describe(labels)}'
        )
    if labels.size and not (labels.min() >= 0 and labels.max() < _CIFAR_CLASSES):
        raise malformed(f"labels must be in 0..{_CIFAR_CLASSES - 1}")
    return data.reshape(-1, *_CIFAR_IMAGE_SHAPE), labels.astype(np.int64)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return f"a {type(value).__name__}"


def load_cifar10(root: str | os.PathLike[str], split: str = "train") -> ImageData:
    """CIFAR-10 from a local folder of its python batches.

    ``root`` is CIFAR-10's ``cifar-10-batches-py`` folder (``data_batch_1`` to ``data_batch_5``
    and ``test_batch``), or the folder that holds it. Each batch is a pickled dict with
    ``b"data"``, a ``(10000, 3072)`` uint8 array of 1024 red, 1024 green and 1024 blue values
    per image, and ``b"labels"``, 10000 ints in 0..9.

    The batches are pickles: take them from a trusted source. They are read by an unpickler
    that resolves only what numpy arrays need and refuses any other function a tampered file
    names; their content (keys, dtype, shapes, label range) is then checked.

    Args:
        root: ``cifar-10-batches-py`` or its parent.
        split: ``"train"`` (the five data batches, 50000 images, in order) or ``"test"``
            (10000).

    Returns:
        :class:`ImageData` with images of shape ``(n, 3, 32, 32)`` and ``levels = 256``.

    Raises:
        ValueError: for an unknown split, or a missing, unreadable or malformed batch; the
            message names the files expected and the folder to put them in.
    """
    _check_split(split, tuple(_CIFAR_FILES))
    folder = _as_folder(root, _cifar_help(Path(root)))
    if (folder / _CIFAR_FOLDER).is_dir():
        folder = folder / _CIFAR_FOLDER
    help_text = _cifar_help(folder)
    paths = [folder / name for name in _CIFAR_FILES[split]]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise ValueError(f"expected {', '.join(missing)} in {folder}; {help_text}")
    batches = [_read_cifar_batch(path, help_text) for path in paths]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), 256, "cifar10")


def load_images(
    name: str,
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    seed: int | None = None,
) -> ImageData:
    """Load the image data set ``name``: one entry to :func:`load_digits`, :func:`load_mnist`
    and :func:`load_cifar10`.

    Args:
        name: one of :data:`IMAGE_NAMES`.
        root: the folder with the files, required for mnist and cifar10; digits take none.
        split: ``"train"`` or ``"test"``; digits also have ``"val"`` and ``"all"``.
        seed: the digits split's seed (None means 0, the standard split); MNIST and CIFAR-10
            have fixed splits and take none.

    Returns:
        :class:`ImageData`.

    Raises:
        ValueError: for an unknown name, a missing ``root`` for mnist or cifar10, a ``root``
            for digits or a ``seed`` for mnist or cifar10, and as the loaders do.
        ImportError: for digits without scikit-learn.
    """
    if name not in IMAGE_NAMES:
        raise ValueError(
            f"unknown image data set {name!r}; choose one of: {', '.join(IMAGE_NAMES)}"
        )
    if name == "digits":
        if root is not None:
            raise ValueError("the digits data set comes with scikit-learn; pass no root for it")
        return load_digits(split, seed=0 if seed is None else seed)
    if root is None:
        raise ValueError(f"{name} is read from local files: pass root, the folder holding them")
    if seed is not None:
        raise ValueError(f"{name} has a fixed train/test split; seed applies to digits only")
    loader = load_mnist if name == "mnist" else load_cifar10
    return loader(root, split)
