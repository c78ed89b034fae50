"""The bundled tables: patches of scikit-learn's photographs, its breast-cancer features and the
synthetic set with a known density (:mod:`cnf.data.bundled`)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from cnf.data import (
    BUNDLED_NAMES,
    bundled,
    load_breast_cancer,
    load_bundled,
    load_patches,
    load_synthetic,
    sample_synthetic,
    synthetic_entropy,
    synthetic_log_prob,
    synthetic_scales,
)
from cnf.data.tables import PARTS, split_rows

SHAPES = {
    "patches": ((40_000, 4_000, 10_000), 63),
    "breast-cancer": ((455, 57, 57), 30),
    "synthetic8": ((20_000, 2_000, 10_000), 8),
}
NEEDS_SKLEARN = {"patches", "breast-cancer"}
SMALL = (600, 200, 200)  # patches enough to test the preprocessing, quick to cut


def _skip_without_sklearn(name: str) -> None:
    if name in NEEDS_SKLEARN:
        pytest.importorskip("sklearn")


@pytest.mark.deadline(30)
@pytest.mark.parametrize("name", BUNDLED_NAMES)
def test_each_set_has_its_sizes_width_and_dtype(name):
    _skip_without_sklearn(name)
    data = load_bundled(name)
    sizes, dim = SHAPES[name]
    assert data.name == name and data.dim == dim and len(data.columns) == dim
    assert tuple(data.sizes[part] for part in PARTS) == sizes
    for part in PARTS:
        assert data.parts[part].dtype == torch.float64
        assert data.parts[part].shape == (data.sizes[part], dim)
    assert (data.entropy is not None) == (name == "synthetic8")


@pytest.mark.deadline(30)
@pytest.mark.parametrize("name", BUNDLED_NAMES)
def test_the_same_seed_gives_the_same_rows_and_another_seed_others(name):
    _skip_without_sklearn(name)
    first, again = load_bundled(name, seed=3), load_bundled(name, seed=3)
    other = load_bundled(name, seed=4)
    for part in PARTS:
        assert torch.equal(first.parts[part], again.parts[part])
        assert not torch.equal(first.parts[part], other.parts[part])


def test_unknown_names_and_impossible_sizes_are_refused():
    with pytest.raises(ValueError, match="choose one of"):
        load_bundled("bsds300")
    with pytest.raises(ValueError, match=r"\(train, val, test\)"):
        load_synthetic(n=(100, 10))
    with pytest.raises(ValueError, match="dim >= 2"):
        load_synthetic(dim=1)
    with pytest.raises(ValueError, match="test band of image 0 has 23940 patch positions"):
        bundled._patch_origins([(427, 640)] * 2, (10, 10, 50_000), 0)


# ---------------------------------------------------------------------------------------------
# patches


@pytest.mark.deadline(30)
def test_patch_columns_name_the_63_kept_pixels():
    pytest.importorskip("sklearn")
    columns = load_patches(n=SMALL).columns
    assert columns[:3] == ("r0c0", "r0c1", "r0c2") and columns[-1] == "r7c6"
    assert len(set(columns)) == 63 and "r7c7" not in columns


@pytest.mark.deadline(30)
@pytest.mark.parametrize("seed", [0, 1])
def test_no_test_or_validation_patch_shares_a_pixel_with_another_part(seed):
    shapes = [(427, 640)] * 2
    origins = bundled._patch_origins(shapes, bundled.PATCH_SIZES, seed)
    covered = {part: np.zeros((2, 427, 640), dtype=bool) for part in PARTS}
    for part in PARTS:
        assert len(origins[part]) == dict(zip(PARTS, bundled.PATCH_SIZES))[part]
        for image, row, col in origins[part]:
            covered[part][image, row : row + 8, col : col + 8] = True
    assert not (covered["train"] & covered["test"]).any()
    assert not (covered["train"] & covered["val"]).any()
    assert not (covered["val"] & covered["test"]).any()
    # both photographs give patches to every part, and positions within a part are distinct
    for part in PARTS:
        assert set(origins[part][:, 0]) == {0, 1}
        assert len(np.unique(origins[part], axis=0)) == len(origins[part])


@pytest.mark.deadline(30)
def test_patches_are_dequantized_rescaled_zero_mean_cuts_of_the_grey_photographs():
    pytest.importorskip("sklearn")
    grey = bundled._grey_photographs()
    assert [image.shape for image in grey] == [(427, 640)] * 2
    assert all(image.dtype == np.uint8 for image in grey)
    parts, origins = bundled._patch_parts(0, SMALL)
    data = load_patches(seed=0, n=SMALL)
    for part in PARTS:
        kept = parts[part]
        assert np.array_equal(data.parts[part].numpy(), kept)
        # the dropped bottom-right pixel is minus the sum of the others (the patch is zero-mean)
        full = np.concatenate([kept, -kept.sum(axis=1, keepdims=True)], axis=1)
        levels = np.stack(
            [grey[i][r : r + 8, c : c + 8].reshape(64) for i, r, c in origins[part]]
        ).astype(np.float64)
        # what is left over is the noise u ~ U[0, 1) less its patch mean: a spread below one
        # level on all 64 pixels, the rebuilt one included, and not zero (there is noise)
        noise = 256 * full - (levels - levels.mean(axis=1, keepdims=True))
        spread = noise.max(axis=1) - noise.min(axis=1)
        assert spread.max() < 1.0 and spread.min() > 0.3
        assert abs(noise.std() - math.sqrt(1 / 12)) < 0.02
        assert np.abs(kept).max() < 1.0 and 0.02 < kept.std() < 0.3


def test_the_grey_levels_use_the_bt601_luma_weights():
    assert bundled.LUMA == (0.299, 0.587, 0.114)
    assert math.isclose(sum(bundled.LUMA), 1.0)


# ---------------------------------------------------------------------------------------------
# breast cancer


@pytest.mark.deadline(30)
@pytest.mark.parametrize("seed", [0, 7])
def test_breast_cancer_parts_are_scikit_learns_rows_split_by_split_rows(seed):
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    bunch = sklearn_datasets.load_breast_cancer()
    data = load_breast_cancer(seed=seed)
    assert data.columns == tuple(str(name) for name in bunch.feature_names)
    index = split_rows(569, seed)
    for part in PARTS:
        assert np.array_equal(data.parts[part].numpy(), bunch.data[index[part]])
    # the union of the parts is a permutation of the original rows, untransformed
    union = np.concatenate([data.parts[part].numpy() for part in PARTS])
    assert np.array_equal(union[np.lexsort(union.T)], bunch.data[np.lexsort(bunch.data.T)])


def test_missing_scikit_learn_says_how_to_install_it(monkeypatch):
    bundled._grey_photographs.cache_clear()  # else a cached load would not need sklearn
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_patches(n=SMALL)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_bundled("breast-cancer")
    assert load_synthetic(n=(10, 5, 5)).dim == 8  # needs nothing


# ---------------------------------------------------------------------------------------------
# synthetic


def _forward(z: torch.Tensor) -> torch.Tensor:
    """The map of :func:`sample_synthetic`'s docstring, written out coordinate by coordinate."""
    columns = [z[0], z[1] + 2 * torch.tanh(4 * z[0])]
    for k in range(2, len(z)):
        columns.append(z[k] + torch.sin(2 * columns[k - 1]))
    return torch.stack(columns)


def test_synthetic_samples_follow_the_documented_map():
    scales = synthetic_scales(8)
    z = np.random.default_rng(11).standard_normal((50, 8)) * scales
    x = sample_synthetic(50, 11)
    expected = torch.stack([_forward(row) for row in torch.from_numpy(z)])
    assert np.allclose(x, expected.numpy(), rtol=0, atol=1e-12)


@pytest.mark.deadline(30)
def test_synthetic_log_prob_is_the_change_of_variables_with_autograds_jacobian():
    scales = torch.as_tensor(synthetic_scales(8))
    gauss = torch.distributions.Normal(torch.zeros(8, dtype=torch.float64), scales)
    z = gauss.sample((20,))
    for row in z:
        jacobian = torch.autograd.functional.jacobian(_forward, row)
        sign, logdet = torch.linalg.slogdet(jacobian)
        assert sign == 1 and abs(float(logdet)) < 1e-12  # volume-preserving
        assert torch.allclose(jacobian.triu(1), torch.zeros(8, 8, dtype=torch.float64))
        x = _forward(row)
        direct = gauss.log_prob(row).sum() - logdet
        assert torch.allclose(synthetic_log_prob(x[None])[0], direct, rtol=0, atol=1e-10)


@pytest.mark.deadline(30)
def test_synthetic_entropy_matches_a_monte_carlo_estimate():
    x = sample_synthetic(200_000, 5)
    log_p = synthetic_log_prob(x).numpy()
    estimate, stderr = -log_p.mean(), log_p.std() / math.sqrt(len(log_p))
    assert abs(estimate - synthetic_entropy(8)) < 4 * stderr
    closed = sum(0.5 * math.log(2 * math.pi * math.e * s**2) for s in synthetic_scales(8))
    assert math.isclose(load_synthetic(n=(10, 5, 5)).entropy, closed)


def test_the_two_dimensional_synthetic_density_integrates_to_one():
    grid = torch.linspace(-7, 7, 1401, dtype=torch.float64)
    x0, x1 = torch.meshgrid(grid, grid, indexing="ij")
    density = synthetic_log_prob(torch.stack([x0.ravel(), x1.ravel()], 1)).exp()
    step = float(grid[1] - grid[0])
    assert abs(float(density.sum()) * step**2 - 1.0) < 1e-6


def test_synthetic_parts_are_fresh_draws_and_x1_is_bimodal():
    data = load_synthetic()
    assert data.name == "synthetic8" and data.columns[0] == "x0"
    train, test = data.parts["train"].numpy(), data.parts["test"].numpy()
    assert not np.isin(test[:, 0], train[:, 0]).any()
    counts, _ = np.histogram(train[:, 1], bins=[-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert counts[0] > 1.5 * counts[2] and counts[4] > 1.5 * counts[2]  # a dip between modes


def test_synthetic_log_prob_refuses_a_single_column():
    with pytest.raises(ValueError, match="D >= 2"):
        synthetic_log_prob(torch.zeros(5, 1))
