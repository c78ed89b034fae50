"""Recipes: what makes each data set train well, in one read-only table.

A :class:`Recipe` holds, for one data set and one model architecture, everything that is not
the model's code: the event shape and grey levels of the data, the split, the model settings,
the training defaults (keywords of :func:`cnf.training.fit`), the evaluation policy and the
loader. ``cnf train`` is flag parsing over :func:`get`; Python code reads the same entries, so
the two train the same model::

    recipe = cnf.recipes.get("8gaussians")
    model, data = cnf.models.build(recipe.spec()), recipe.load()
    history = cnf.training.fit(model, data.sampler(), **recipe.fit_options(iters=500))

(``cnf train`` also passes ``recipe.validation(data.part("val", seed=1))``, which scores the model
during training without changing what it learns, and its checkpoint settings.)

The table, :data:`RECIPES`, maps ``(data, architecture)`` to a frozen :class:`Recipe`; the first
architecture listed for a data set is its default. Adding a data set is one entry plus, for a new
kind of data, a loader: a function ``loader(recipe, root, split_seed)`` that returns an object
with the members of :class:`FreshDraws` and :class:`ImageSplits` (``sampler``, ``part``,
``describe``, ``entropy``).

A checkpoint written by ``cnf train`` stores its :class:`Record` (recipe, split seed, data
folder), from which ``cnf eval`` and ``cnf plot`` rebuild the same split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .data import (
    BENCHMARK_FILES,
    BENCHMARK_NAMES,
    CONDITIONAL_NAMES,
    TabularData,
    load_benchmark,
    load_bundled,
    load_file,
)
from .data import NAMES as TOY_NAMES
from .settings import check_choice

if TYPE_CHECKING:
    from .training import Sampler

__all__ = [
    "RECIPES",
    "Evaluation",
    "STAGES",
    "FlowMatchingPlan",
    "ConditionalDraws",
    "FreshDraws",
    "ImageSplits",
    "Recipe",
    "Record",
    "Split",
    "architectures",
    "get",
    "names",
]

KINDS = ("toy2d", "tabular", "image")  # the model kinds cnf.models.build knows

STAGES = ("likelihood", "flow-matching", "finish")
"""Ways to train a recipe's model (:meth:`Recipe.fit_options`): maximum likelihood, flow
matching, and the maximum-likelihood finish that continues a flow-matching model."""


def _frozen(mapping: Mapping[str, Any] | None = None, **items: Any) -> MappingProxyType:
    """A read-only copy of ``mapping`` updated with ``items``."""
    return MappingProxyType({**(mapping or {}), **items})


@dataclass(frozen=True)
class Split:
    """How a data set is divided into train, validation and test parts.

    Attributes:
        seed: the split's seed for data sets whose split is drawn (the digits' permutation,
            :func:`cnf.data.load_digits`); None where the files fix it or every part is drawn
            fresh (2-D toy data).
        sizes: points per part: for toy data the number of fresh draws of the validation and
            test parts; for images the sizes the split has (for the record).
        holdout: for data sets that ship only train and test files, hold out the last
            ``len(train) // holdout`` (at least one) training images for validation.
    """

    seed: int | None = None
    sizes: Mapping[str, int] = field(default_factory=_frozen)
    holdout: int | None = None


@dataclass(frozen=True)
class Evaluation:
    """How a model of this recipe is scored.

    Attributes:
        tol: rtol = atol of ``cnf eval`` and of the test value ``cnf train`` reports.
        trace: the divergence for validation and test, ``"exact"`` or ``"hutchinson"`` (the
            exact trace costs a vector-Jacobian product per dimension, too many for MNIST).
        metric: ``"nll"`` (nats) for continuous data, ``"bits_per_dim"`` for images.
        draws: dequantization draws per validation (images; 0 for continuous data).
        test_draws: dequantization draws of ``cnf eval``.
        batch_size: the batch of ``cnf eval``.
        keep_best: keep the checkpoint with the best validation score as ``best.pt`` and report
            it (for data sets small enough to overfit).
    """

    tol: float
    trace: str = "exact"
    metric: str = "nll"
    draws: int = 0
    test_draws: int = 0
    batch_size: int = 5000
    keep_best: bool = False

    def __post_init__(self) -> None:
        if self.trace not in ("exact", "hutchinson"):
            raise ValueError(f"trace must be 'exact' or 'hutchinson', got {self.trace!r}")
        if self.metric not in ("nll", "bits_per_dim"):
            raise ValueError(f"metric must be 'nll' or 'bits_per_dim', got {self.metric!r}")
        if (self.metric == "bits_per_dim") != (self.draws > 0 and self.test_draws > 0):
            raise ValueError("bits/dim needs dequantization draws; NLL takes none")


@dataclass(frozen=True)
class FlowMatchingPlan:
    """How a data set trains by flow matching, and how its maximum-likelihood finish runs.

    Attributes:
        objective: keywords of :class:`cnf.training.FlowMatching` (``coupling``, ``time``,
            ``sigma_min``, ``ot_block``).
        model: model settings that replace the recipe's for flow matching (generic names, as
            :meth:`Recipe.spec` takes them), e.g. a wider field: its steps are cheap.
        training: keywords of :func:`cnf.training.fit` that replace the recipe's likelihood
            defaults when training by flow matching (``kinetic`` and ``jacobian`` are 0 there:
            they weight the likelihood).
        finish_iters: iterations of the maximum-likelihood finish ``cnf train --objective
            flow-matching`` runs by default (0: none; ``--finish-ml`` changes it).
        finish: keywords of :func:`cnf.training.fit` that replace the recipe's likelihood
            defaults in the finish (its ``iters`` is :attr:`finish_iters`).
    """

    objective: Mapping[str, Any] = field(default_factory=_frozen)
    model: Mapping[str, Any] = field(default_factory=_frozen)
    training: Mapping[str, Any] = field(default_factory=_frozen)
    finish_iters: int = 0
    finish: Mapping[str, Any] = field(default_factory=_frozen)

    def make_objective(self, **changes: Any):
        """The :class:`cnf.training.FlowMatching` objective of this plan, with ``changes``
        (None keeps the plan's value)."""
        from .training import FlowMatching

        changes = {k: v for k, v in changes.items() if v is not None}
        return FlowMatching(**{**self.objective, **changes})


@dataclass(frozen=True)
class Recipe:
    """Everything but the code that makes one data set train well with one architecture.

    Attributes:
        name: the data set (``cnf train --data``).
        architecture: the model family (``--architecture``): ``"mlp"`` for 2-D points and
            tables, ``"dense"`` or ``"multiscale"`` for images.
        kind: the kind of model spec (:func:`cnf.models.build`): ``"toy2d"``, ``"tabular"``
            or ``"image"``.
        event_shape: the shape of one point or image; None where the data decide (a user's
            file: ``(D,)`` for its ``D`` columns).
        levels: grey levels of integer images; None for continuous data.
        model: the model settings the recipe chooses, over the model's own defaults (training
            solver included: ``trace``, ``rtol``, ``atol``).
        aliases: this model's keyword for a generic setting (``hidden`` is
            ``hidden_channels`` for a multiscale model).
        training: defaults of :func:`cnf.training.fit`'s keywords.
        augment: keywords of the training sampler (``translate``: one-pixel moves).
        split: the train / validation / test split.
        evaluation: how models are validated and tested.
        loader: ``loader(recipe, root, split_seed)`` returning the data (:meth:`load`).
        flow_matching: how this model trains by flow matching (:class:`FlowMatchingPlan`).
    """

    name: str
    architecture: str
    kind: str
    event_shape: tuple[int, ...] | None
    levels: int | None
    model: Mapping[str, Any]
    training: Mapping[str, Any]
    evaluation: Evaluation
    loader: Callable[..., Any]
    split: Split = Split()
    augment: Mapping[str, Any] = field(default_factory=_frozen)
    aliases: Mapping[str, str] = field(default_factory=_frozen)
    flow_matching: FlowMatchingPlan = FlowMatchingPlan()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; choose one of {KINDS}")
        if (self.levels is None) != (self.evaluation.metric == "nll"):
            raise ValueError(f"{self.name}: integer levels go with bits/dim, none with NLL")
        if not {"rtol", "atol", "trace"} <= set(self.model):
            raise ValueError(f"{self.name}: the model settings must name trace, rtol and atol")

    @property
    def tol(self) -> float:
        """The training solves' tolerance (rtol; atol is the same in every recipe)."""
        return self.model["rtol"]

    def spec(self, **settings: Any) -> dict[str, Any]:
        """The model spec (:func:`cnf.models.build`) of this recipe with ``settings`` changed.

        Settings left at None keep the recipe's value; ``tol`` sets both ``rtol`` and ``atol``;
        generic names are renamed by :attr:`aliases`. Tables need ``dim``, the number of
        columns, where the recipe's :attr:`event_shape` does not fix it (a user's file: use
        :meth:`new_model`, which reads it off the data). Unknown settings are a ``ValueError``.
        """
        from . import models

        settings = {k: v for k, v in settings.items() if v is not None}
        if "tol" in settings:
            tol = settings.pop("tol")
            settings.update(rtol=tol, atol=tol)
        dim = settings.pop("dim", None)
        options = {**self.model, **{self.aliases.get(k, k): v for k, v in settings.items()}}
        if self.kind == "toy2d":
            return models.toy_spec(**options)
        if self.kind == "tabular":
            return models.tabular_spec(self._dim(dim), **options)
        return models.image_spec(self.name, self.architecture, **options)

    def _dim(self, dim: int | None) -> int:
        """The columns of this recipe's tables: ``dim``, or the one its event shape fixes."""
        fixed = None if self.event_shape is None else self.event_shape[0]
        if dim is None and fixed is None:
            raise ValueError(f"{self.name}: pass dim, the data's number of columns")
        if dim is not None and fixed is not None and dim != fixed:
            raise ValueError(f"{self.name} has {fixed} columns, not dim={dim}")
        return int(fixed if dim is None else dim)

    def new_model(self, data, *, flow_matching: bool = False, **settings: Any) -> nn.Module:
        """The untrained model of this recipe for ``data`` (what :meth:`load` returned): the
        :meth:`spec` (or :meth:`flow_matching_spec`) with ``settings``, built; a table's model
        has as many columns as ``data`` and its Standardize step fitted to the training part.

        Example (a user's array ``x`` of shape ``(n, D)``, saved to ``mine.npy``)::

            recipe = cnf.recipes.get("file")
            data = recipe.load("mine.npy")
            model = recipe.new_model(data)
            cnf.training.fit(model, data.sampler(), **recipe.fit_options(),
                             **recipe.validation(data.part("val")), checkpoint_dir="runs/mine")
        """
        from .models import build

        if self.kind == "tabular":
            settings["dim"] = data.dim
        settings.setdefault("context", getattr(data, "embedding", None))
        make = self.flow_matching_spec if flow_matching else self.spec
        return self.fit_data_steps(build(make(**settings)), data)

    def fit_data_steps(self, model: nn.Module, data) -> nn.Module:
        """``model`` with its data-dependent steps fitted to ``data``'s training part: a
        table's Standardize step and the standardization of its context columns
        (:func:`cnf.models.fit_standardization`, the columns named in its errors); other kinds
        have none. Returns ``model``."""
        from .models import fit_standardization
        from .training import split_context

        if self.kind == "tabular":
            rows, contexts = split_context(data.part("train"))
            fit_standardization(model, rows, names=data.columns, context=contexts)
        return model

    def fit_options(self, stage: str = "likelihood", **overrides: Any) -> dict[str, Any]:
        """Keywords of :func:`cnf.training.fit` for one of the :data:`STAGES`, updated with the
        ``overrides`` that are not None (any keyword of ``fit``; others are an error).

        ``"likelihood"``: the recipe's training defaults. ``"flow-matching"``: those with the
        flow-matching plan's changes and its objective (the model must come from
        :meth:`flow_matching_spec`). ``"finish"``: the likelihood defaults with the plan's
        finish changes, for :attr:`FlowMatchingPlan.finish_iters` iterations.
        """
        from .training import FitConfig

        known = {f.name for f in fields(FitConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"{unknown} are not keywords of cnf.training.fit; valid: {sorted(known)}"
            )
        check_choice("training stage", stage, STAGES)
        plan = self.flow_matching
        changes: dict[str, Any] = {}
        if stage == "flow-matching":
            changes = {"kinetic": 0.0, "jacobian": 0.0, **plan.training}
            changes["objective"] = plan.make_objective()
        elif stage == "finish":
            changes = {**plan.finish, "iters": max(plan.finish_iters, 1)}
        given = {k: v for k, v in overrides.items() if v is not None}
        return {**self.training, **changes, **given}

    def flow_matching_spec(self, **settings: Any) -> dict[str, Any]:
        """:meth:`spec` for flow matching: the plan's model settings (:attr:`FlowMatchingPlan.
        model`), then ``settings`` (None keeps the plan's value); the blocks' ``T`` fixed
        (``train_T=False``) and adding up to 1, each ``1 / blocks`` unless ``T`` is given."""
        from .continuous import CNFTransform
        from .models import build

        if self.architecture == "multiscale":
            raise ValueError(
                "flow matching does not train the multiscale model: it factors channels out "
                "between scales, so a straight path from noise to an image gives its inner "
                "blocks no target; use the dense architecture (--architecture dense)"
            )
        if settings.get("train_T"):
            raise ValueError("flow matching needs a fixed integration time: train_T=False")
        given = {k: v for k, v in settings.items() if v is not None}
        settings = {**self.flow_matching.model, **given, "train_T": False}
        if settings.get("T") is None:
            with torch.random.fork_rng(devices=[]):  # counting blocks must not move the seed
                model = build(self.spec(**settings))
            blocks = sum(isinstance(m, CNFTransform) for m in model.modules())
            settings["T"] = 1.0 / blocks
        return self.spec(**settings)

    def load(
        self, root: str | None = None, split_seed: int | None = None, **options: Any
    ) -> FreshDraws | ImageSplits | TabularData:
        """The data, split as :attr:`split` says (``split_seed`` replaces its seed); ``root``:
        the folder of data sets read from files (a user's file: the file itself); ``options``:
        keywords of the loader (a file's ``columns`` and ``drop_nonfinite``). Returns a
        :class:`FreshDraws`, :class:`ImageSplits` or :class:`cnf.data.TabularData`."""
        return self.loader(self, root, split_seed, **options)

    def score(
        self,
        model: nn.Module,
        data: Tensor,
        *,
        tol: float | None = None,
        draws: int | None = None,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> float:
        """The evaluation metric of ``model`` on ``data`` (points, or ``(points, contexts)`` for
        a conditional model), lower is better: mean NLL in nats, or bits/dim averaged over
        ``draws`` dequantizations (seeded by ``seed``).

        ``tol`` (default :attr:`Evaluation.tol`), ``draws`` (default :attr:`Evaluation.draws`)
        and ``batch_size`` (default: the evaluator's) override the policy.
        """
        from .training import evaluate_bits_per_dim, evaluate_nll, split_context
        from .training.sampling import place_context

        policy = self.evaluation
        tol = policy.tol if tol is None else tol
        solver = {"trace": policy.trace, "rtol": tol, "atol": tol}
        if batch_size is not None:
            solver["batch_size"] = batch_size
        data, context = split_context(data)
        ref = next(model.parameters())
        if context is not None:
            solver["context"] = place_context(context, ref.dtype, ref.device)
        if policy.metric == "nll":
            return evaluate_nll(model, data.to(device=ref.device, dtype=ref.dtype), **solver)
        draws = policy.draws if draws is None else draws
        return evaluate_bits_per_dim(model, data, self.levels, draws=draws, seed=seed, **solver)

    def validation(
        self, val: Tensor, *, tol: float | None = None, draws: int | None = None
    ) -> dict[str, Any]:
        """Keywords of :func:`cnf.training.fit` that score the model on ``val`` as it trains
        (at the training tolerance unless ``tol`` is given) and keep the best checkpoint where
        the policy says so; they need ``checkpoint_dir`` then."""
        tol = self.tol if tol is None else tol

        def score(model: nn.Module) -> float:
            return self.score(model, val, tol=tol, draws=draws)

        return {"eval_fn": score, "keep_best": self.evaluation.keep_best}

    def record(
        self, root: str | None = None, split_seed: int | None = None, **options: Any
    ) -> Record:
        """What a checkpoint stores to find this recipe and its data again (a user's file by
        its absolute path, so that ``cnf eval`` finds it from any folder)."""
        seed = self.split.seed if split_seed is None else split_seed
        if root is not None:
            root = str(Path(root).resolve()) if self.name == "file" else str(root)
        options = {k: v for k, v in options.items() if v is not None} or None
        return Record(self.name, self.architecture, seed, root, options)


@dataclass(frozen=True)
class Record:
    """The recipe of a checkpoint: enough to rebuild its split (a plain dict inside it).

    Attributes:
        name, architecture: the key of the recipe in :data:`RECIPES`.
        split_seed: the seed of the split the model was trained on (None: a fixed split).
        root: the folder the data were read from (None: bundled or generated data); for a
            user's file, the file.
        options: the loader's keywords (a file's ``columns``, ``drop_nonfinite``), or None.
    """

    name: str
    architecture: str
    split_seed: int | None = None
    root: str | None = None
    options: Mapping[str, Any] | None = None

    @property
    def recipe(self) -> Recipe:
        return get(self.name, self.architecture)

    def load(self):
        """The data of the run: the recipe's loader on the recorded folder and split."""
        return self.recipe.load(self.root, self.split_seed, **(self.options or {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "split_seed": self.split_seed,
            "root": self.root,
            "options": None if self.options is None else dict(self.options),
        }

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any], source: str = "checkpoint") -> Record:
        """The record of a checkpoint of ``cnf train``; for checkpoints written before records
        existed, the one their spec implies (the default split).

        Raises:
            cnf.training.CheckpointError: the checkpoint names no recipe and no data set.
        """
        from .training import CheckpointError

        if "recipe" in state:
            return cls(**state["recipe"])
        if "spec" not in state or "data" not in state:
            raise CheckpointError(f"{source} names no data set; was it written by `cnf train`?")
        spec = state["spec"]
        # image specs written before dense models existed name no architecture: multiscale
        architecture = "mlp" if spec.get("kind") == "toy2d" else spec.get("architecture")
        recipe = get(state["data"], architecture or "multiscale")
        return recipe.record(root=state.get("root") or None)


def _refuse_translate(translate: float | None) -> None:
    """Fresh 2-D draws have no pixels to move: a ``--translate`` value is an error."""
    if translate is not None:
        raise ValueError("--translate moves images by a pixel; it does not apply to 2-D data")


class FreshDraws:
    """A 2-D toy data set: the training batches and every held-out part are fresh draws."""

    def __init__(self, recipe: Recipe, root: str | None = None, split_seed: int | None = None):
        if root is not None:
            raise ValueError(f"{recipe.name} is generated, not read from files: pass no root")
        if split_seed is not None:
            raise ValueError(
                f"{recipe.name} has no split to seed: its held-out points are fresh draws"
            )
        self.name, self.sizes = recipe.name, dict(recipe.split.sizes)

    @property
    def entropy(self) -> float | None:
        """The data's differential entropy in nats where it has a closed form, else None."""
        from .data import DENSITY_NAMES, density

        return density(self.name).entropy if self.name in DENSITY_NAMES else None

    def describe(self) -> str:
        return "fresh batches"

    def sampler(self, translate: float | None = None) -> Sampler:
        """Fresh training batches, ``sampler(n, generator)`` (:func:`cnf.data.toy_sampler`)."""
        from .data import toy_sampler

        _refuse_translate(translate)
        return toy_sampler(self.name)

    def part(self, name: str, *, seed: int = 0, n: int | None = None) -> Tensor:
        """``n`` points (default: :attr:`Split.sizes` of ``name``) drawn with ``seed``, float64."""
        from .data import sample_tensor

        if n is None and name not in self.sizes:
            raise ValueError(f"no default size for part {name!r} of {self.name}; pass n")
        return sample_tensor(
            self.name, self.sizes[name] if n is None else n, seed, dtype=torch.float64
        )


class ImageSplits:
    """An image data set's train, validation and test images, as integer levels (``uint8``);
    with ``conditional``, also their class labels: parts and batches are then
    ``(images, labels)`` pairs, for a class-conditional model."""

    entropy = None

    def __init__(
        self,
        recipe: Recipe,
        root: str | None = None,
        split_seed: int | None = None,
        *,
        conditional: bool = False,
    ):
        from .data import load_images

        seed = recipe.split.seed if split_seed is None else split_seed
        holdout = recipe.split.holdout
        if holdout is None:
            loaded = {
                part: load_images(recipe.name, root=root, split=part, seed=seed)
                for part in ("train", "val", "test")
            }
            self.parts = {part: d.images for part, d in loaded.items()}
            labels = {part: d.labels for part, d in loaded.items()}
        else:
            full = load_images(recipe.name, root=root, split="train", seed=seed)
            n_val = max(1, len(full.images) // holdout)
            test = load_images(recipe.name, root=root, split="test", seed=seed)
            self.parts = {"train": full.images[:-n_val], "val": full.images[-n_val:]}
            self.parts["test"] = test.images
            labels = {"train": full.labels[:-n_val], "val": full.labels[-n_val:]}
            labels["test"] = test.labels
        self.labels = labels if conditional else None
        self.levels = recipe.levels
        self.augment = dict(recipe.augment)

    @property
    def sizes(self) -> dict[str, int]:
        return {part: len(images) for part, images in self.parts.items()}

    @property
    def embedding(self) -> dict | None:
        """``{"classes": K}`` for class-conditional data (the labels are ``0..K-1``), else None."""
        if self.labels is None:
            return None
        return {"classes": int(max(int(y.max()) for y in self.labels.values())) + 1}

    def describe(self) -> str:
        sizes = " / ".join(f"{n} {part}" for part, n in self.sizes.items()) + " images"
        return sizes + (" with their labels" if self.labels is not None else "")

    def sampler(self, translate: float | None = None) -> Sampler:
        """Dequantized training batches (:func:`cnf.training.image_sampler`), translated by a
        pixel with probability ``translate`` (default: the recipe's augmentation); with their
        labels for class-conditional data."""
        from .training import image_sampler

        options = {**self.augment, **({} if translate is None else {"translate": translate})}
        labels = None if self.labels is None else self.labels["train"]
        return image_sampler(self.parts["train"], self.levels, labels=labels, **options)

    def part(
        self, name: str, *, seed: int = 0, n: int | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The images of part ``name`` (the first ``n`` if given), with their labels for
        class-conditional data; ``seed`` is unused, the split being fixed when loaded."""
        if name not in self.parts:
            raise ValueError(f"unknown part {name!r}; choose one of {sorted(self.parts)}")
        if self.labels is None:
            return self.parts[name][:n]
        return self.parts[name][:n], self.labels[name][:n]


class ConditionalDraws(FreshDraws):
    """A conditional 2-D family (:mod:`cnf.data.conditional`): fresh ``(points, contexts)``
    pairs, the context a number in [-1, 1] per point."""

    embedding = MappingProxyType({"inputs": 1, "hidden": (32,), "features": 16})
    """The context's embedding: the number through a small MLP (see the recipe's notes)."""

    @property
    def entropy(self) -> float:
        """The expected conditional entropy :math:`E_c H(x \\mid c)` in nats."""
        from .data import conditional_density

        return conditional_density(self.name).entropy

    def describe(self) -> str:
        return "fresh (point, context) pairs"

    def sampler(self, translate: float | None = None) -> Sampler:
        """Fresh training pairs, ``sampler(n, generator) -> (points, contexts)``."""
        from .data import conditional_sampler

        _refuse_translate(translate)
        return conditional_sampler(self.name)

    def part(self, name: str, *, seed: int = 0, n: int | None = None) -> tuple[Tensor, Tensor]:
        """``n`` pairs (default: :attr:`Split.sizes` of ``name``) drawn with ``seed``, float64."""
        from .data import sample_conditional

        if n is None and name not in self.sizes:
            raise ValueError(f"no default size for part {name!r} of {self.name}; pass n")
        x, c = sample_conditional(self.name, self.sizes[name] if n is None else n, seed=seed)
        return torch.from_numpy(x), torch.from_numpy(c)


# --- the table ---------------------------------------------------------------------------------

_TOY_TRAINING = _frozen(
    iters=1000,
    batch_size=512,
    lr=5e-3,
    weight_decay=0.0,
    schedule="cosine",
    clip_grad=None,
    kinetic=0.0,
    jacobian=0.0,
    ema=0.995,
    eval_every=100,
)
# Chosen for a 3-minute budget on 2 CPU cores: a large batch with a high, cosine-decayed learning
# rate and an EMA of the weights converges in 1000 iterations to within 0.01 (8gaussians), 0.04
# (pinwheel) and 0.2 nats (checkerboard) of the entropy (scripts/quality_toy.py). The model is
# FFJORD's toy one (cnf.models.TOY_DEFAULTS: ConcatSquash 64-64-64, tanh, learned T from 0.5),
# trained with the exact trace at rtol = atol = 1e-4 and tested at 1e-7.

_TOY_FLOW_MATCHING = FlowMatchingPlan(
    objective=_frozen(coupling="ot", ot_block=32),
    training=_frozen(iters=5000, lr=2e-2, eval_every=500),
    finish=_frozen(lr=1e-3),
)
# Flow matching on 2-D data, from a sweep on one thread (docs/bench_flow_matching.md): with the
# minibatch OT coupling in blocks of 32 (about 1.5 ms a step; blocks of 128 cost 6 ms for no
# better fit) and a learning rate of 2e-2, 5000 steps reach the likelihood default's test NLL
# on 8gaussians and checkerboard and come within ~0.02 nats on pinwheel; without the coupling,
# pinwheel stays ~0.1 nats behind. A likelihood finish of 50 steps moved the NLL by less than
# 0.01 nats either way for half the flow-matching stage's time, so none is run by default.

_TABLE_FLOW_MATCHING = FlowMatchingPlan(
    training=_frozen(iters=5000, lr=5e-3, eval_every=500),
    finish=_frozen(lr=1e-3),
)
# Flow matching on tables: the 2-D plan's length without its OT coupling (it pairs within blocks
# of the batch, which in more dimensions finds few close pairs).

_IMAGE_TRAINING = _frozen(_TOY_TRAINING, batch_size=64, lr=1e-3, eval_every=250)
# MNIST and CIFAR-10: FFJORD's multiscale models (cnf.multiscale), Hutchinson's trace at 1e-5,
# validated every 250 iterations on 2 dequantization draws, the best point kept as best.pt.

_DIGITS_TRAINING = _frozen(
    _IMAGE_TRAINING, iters=2000, batch_size=128, lr=1e-2, kinetic=0.01, jacobian=0.01
)
# The digits' defaults come from a sweep on one thread (README, docs/bench_digits.md): moving half
# the training images by one pixel keeps the train/validation gap near 0.1 bits/dim (0.25
# without) and moves the best validation point from iteration ~1000 to ~1500; the dense field's
# exact trace (a bilinear form in the activation slopes, no autograd) trains about 0.015
# bits/dim lower than Hutchinson's estimate for 25% more time per iteration; tol 1e-3 trains as
# well as 1e-5 at fewer steps; RNODE's weights (0.01, 0.01) cut the NFE by a third at equal
# quality. A conv field's exact trace costs a vector-Jacobian product per pixel, so the
# multiscale digits model keeps Hutchinson's.

_DIGITS_FLOW_MATCHING = FlowMatchingPlan(
    model=_frozen(hidden=[512, 512]),
    training=_frozen(iters=13000, batch_size=256, lr=1e-2, eval_every=2500),
    finish=_frozen(lr=1e-3, kinetic=0.0, jacobian=0.0),
)
# Flow matching on the digits, from a sweep on one thread (docs/bench_flow_matching.md). A step
# costs a forward and backward pass of the field, not a solve, so a wider field pays: 512-512
# reached 1.975 bits/dim (validation) in 8000 steps where 256-256 needed ~25000; 1024-1024 was
# slower per second. Batch 256 at 1e-2 beat batch 128; an EMA of 0.999 changed nothing. The OT
# coupling (blocks of 256) cut log_prob's NFE from 208 to 160 but cost a quarter of the steps
# in 220 s (1.980 against 1.977 bits/dim without it). A likelihood finish gained <= 0.01
# bits/dim for 90 s (200 steps at 1e-3): none by default.

_MULTISCALE = _frozen(hidden="hidden_channels", blocks="blocks_per_scale")


def _image_recipe(name, architecture, shape, levels, split, trace, **changes) -> Recipe:
    """An image recipe: the MNIST/CIFAR-10 settings unless ``changes`` say otherwise."""
    settings = dict(
        kind="image",
        event_shape=shape,
        levels=levels,
        model=_frozen(trace="hutchinson", rtol=1e-5, atol=1e-5, dtype="float32"),
        training=_IMAGE_TRAINING,
        evaluation=Evaluation(
            tol=1e-5,
            trace=trace,
            metric="bits_per_dim",
            draws=2,
            test_draws=4,
            batch_size=256,
            keep_best=True,
        ),
        loader=ImageSplits,
        split=split,
        augment=_frozen(translate=0.0),
        aliases=_MULTISCALE if architecture == "multiscale" else _frozen(),
    )
    return Recipe(name, architecture, **{**settings, **changes})


def _digits(architecture: str, trace: str) -> Recipe:
    return _image_recipe(
        "digits",
        architecture,
        (1, 8, 8),
        17,  # each pixel counts the set bits of a 4x4 block: 0..16
        Split(seed=0, sizes=_frozen(train=1300, val=200, test=297)),
        "exact",  # 64 dimensions: the exact trace is affordable for testing
        model=_frozen(trace=trace, rtol=1e-3, atol=1e-3, dtype="float32"),
        training=_DIGITS_TRAINING,
        augment=_frozen(translate=0.5),
        flow_matching=_DIGITS_FLOW_MATCHING,
    )


def _files(name: str, shape: tuple[int, ...], sizes: dict[str, int]) -> list[Recipe]:
    # validation: the last twelfth of the training files (5000 of MNIST's 60000 images)
    split = Split(sizes=_frozen(sizes), holdout=12)
    return [
        _image_recipe(name, arch, shape, 256, split, "hutchinson")
        for arch in ("multiscale", "dense")
    ]


def _toy(name: str, loader=FreshDraws, flow_matching=_TOY_FLOW_MATCHING) -> Recipe:
    return Recipe(
        name,
        "mlp",
        kind="toy2d",
        event_shape=(2,),
        levels=None,
        model=_frozen(trace="exact", rtol=1e-4, atol=1e-4),
        training=_TOY_TRAINING,
        evaluation=Evaluation(tol=1e-7),
        loader=loader,
        split=Split(sizes=_frozen(val=5000, test=20000)),
        flow_matching=flow_matching,
    )


_CONDITIONAL_TOY_FLOW_MATCHING = FlowMatchingPlan(
    training=_TOY_FLOW_MATCHING.training, finish=_TOY_FLOW_MATCHING.finish
)
# The 2-D plan without its OT coupling, which would pair points of different contexts.


def _file_loader(
    recipe: Recipe,
    root,
    split_seed,
    *,
    columns=None,
    drop_nonfinite: bool = False,
    context_columns=None,
) -> TabularData:
    """A user's file (``root``), split by ``split_seed`` (:func:`cnf.data.load_file`); with
    ``context_columns``, the data of a conditional model."""
    if root is None:
        raise ValueError("the file recipe reads a user's file: pass it, e.g. recipe.load('x.csv')")
    seed = recipe.split.seed if split_seed is None else split_seed
    return load_file(
        root,
        seed=seed,
        columns=columns,
        drop_nonfinite=drop_nonfinite,
        context_columns=context_columns,
    )


def _benchmark_loader(recipe: Recipe, root, split_seed) -> TabularData:
    """One of MAF's preprocessed benchmarks from the folder ``root``; its split is fixed."""
    if split_seed is not None:
        raise ValueError(f"{recipe.name}'s split is fixed by MAF's preprocessing: no split seed")
    if root is None:
        files = ", ".join(BENCHMARK_FILES[recipe.name])
        raise ValueError(
            f"{recipe.name} is read from MAF's preprocessed files: pass the folder that holds "
            f"{files} (--root, or root= in Python); they are MAF's data (zenodo record 1161203)"
        )
    return load_benchmark(recipe.name, root)


def _bundled_loader(recipe: Recipe, root, split_seed) -> TabularData:
    """A table that installs with cnf (:func:`cnf.data.load_bundled`), drawn by its seed."""
    if root is not None:
        raise ValueError(f"{recipe.name} installs with cnf (scikit-learn's data): pass no root")
    seed = recipe.split.seed if split_seed is None else split_seed
    return load_bundled(recipe.name, seed=seed)


_TABLE_TRAINING = _frozen(
    _TOY_TRAINING, iters=2000, batch_size=256, lr=1e-2, weight_decay=1e-6, eval_every=100
)
# Tables of a user's own and the sets that install offline, from a sweep on one thread (60-90 s
# runs, validation NLL at equal time; scripts/bench_tabular.py has the full comparison). The
# field is two ConcatSquash layers of 10 units per column, at least 64 and at most 128: on the
# 63-D patches, 128-128 reached -128 nats where 256-256 reached -81 and FFJORD's 630-630 -74
# (more steps beat a wider field there); softplus. Training at tol 1e-3 (digits' finding again:
# on synthetic8 6.76 nats against 8.04 at 1e-5 in 60 s), batch 256 at lr 1e-2 (6.26; batch 1000
# at 2e-3: 9.54; lr 2e-2: 6.21, within the noise), the EMA of 0.995 kept (6.94 without), no
# RNODE weights (7.92 with 0.01 each: they slow the fit more than they save steps at this tol).

_FFJORD_TABULAR = {
    # name: (nonlinearity, hidden layers, width factor, blocks, batch size)
    "power": ("tanh", 3, 10, 5, 10000),
    "gas": ("tanh", 3, 20, 5, 1000),
    "hepmass": ("softplus", 2, 10, 10, 10000),
    "miniboone": ("softplus", 2, 20, 1, 1000),
    "bsds300": ("softplus", 3, 20, 2, 10000),
}
# FFJORD's published architectures for MAF's tabular benchmarks (Grathwohl et al. 2019, appendix
# table of tabular models; ConcatSquash layers of width factor x D, learned T from 1, Adam at
# 1e-3 with weight decay 1e-6, Hutchinson's trace in training, dopri5 at rtol 1e-6 and atol
# 1e-8 (train_tabular.py's defaults), the exact trace at test, early stopping on the validation
# part). Their test NLL (nats): POWER -0.46, GAS -8.59, HEPMASS 14.92, MINIBOONE 10.43, BSDS300
# -157.40. cnf's tolerances are one number: 1e-6 for both (atol 1e-8 costs steps for no gain
# in NLL at these scales). The iteration budget is ours: FFJORD stopped after 30 validations
# without improvement; keep_best plays that part here. Meant for a GPU: on two CPU cores one
# POWER iteration (batch 10000, five blocks) takes seconds.


def _table(name: str, loader, shape=None, split: Split = Split(seed=0), **changes) -> Recipe:
    """A tabular recipe: the ConcatSquash field on the data's columns after a Standardize
    step fitted to the training rows, the exact trace where it is affordable
    (:func:`cnf.models.exact_trace_affordable`; the ``"auto"`` trace), kept at its best
    validation point (small tables overfit), scored in nats per row in the data's units."""
    settings = dict(
        kind="tabular",
        event_shape=shape,
        levels=None,
        model=_frozen(
            hidden_factor=10,
            layers=2,
            width_range=(64, 128),
            activation="softplus",
            trace="auto",
            rtol=1e-3,
            atol=1e-3,
        ),
        training=_TABLE_TRAINING,
        evaluation=Evaluation(tol=1e-6, batch_size=2000, keep_best=True),
        loader=loader,
        split=split,
        flow_matching=_TABLE_FLOW_MATCHING,
    )
    return Recipe(name, "mlp", **{**settings, **changes})


def _ffjord_table(name: str, dim: int) -> Recipe:
    activation, layers, factor, blocks, batch = _FFJORD_TABULAR[name]
    return _table(
        name,
        _benchmark_loader,
        (dim,),
        Split(),
        model=_frozen(
            hidden_factor=factor,
            layers=layers,
            activation=activation,
            blocks=blocks,
            trace="hutchinson",
            rtol=1e-6,
            atol=1e-6,
        ),
        training=_frozen(
            _TABLE_TRAINING,
            iters=100000,
            batch_size=batch,
            lr=1e-3,
            schedule="constant",
            ema=None,
            eval_every=1000,
        ),
        evaluation=Evaluation(tol=1e-6, batch_size=1000, keep_best=True),
    )


RECIPES: Mapping[tuple[str, str], Recipe] = MappingProxyType(
    {
        (r.name, r.architecture): r
        for r in (
            *(_toy(name) for name in TOY_NAMES),
            *(
                _toy(name, ConditionalDraws, _CONDITIONAL_TOY_FLOW_MATCHING)
                for name in CONDITIONAL_NAMES
            ),
            _digits("dense", "exact"),
            _digits("multiscale", "hutchinson"),
            *_files("mnist", (1, 28, 28), {"train": 55000, "val": 5000, "test": 10000}),
            *_files("cifar10", (3, 32, 32), {"train": 45834, "val": 4166, "test": 10000}),
            _table("file", _file_loader),
            _table("patches", _bundled_loader, (63,)),
            _table("breast-cancer", _bundled_loader, (30,)),
            _table("synthetic8", _bundled_loader, (8,)),
            *(_ffjord_table(name, dim) for name, dim in zip(BENCHMARK_NAMES, (6, 8, 21, 43, 63))),
        )
    }
)
"""Every recipe, by ``(data, architecture)``; read-only. The first architecture listed for a
data set is its default."""


def names() -> tuple[str, ...]:
    """The data sets that have a recipe, in the table's order."""
    return tuple(dict.fromkeys(name for name, _ in RECIPES))


def architectures(name: str | None = None) -> tuple[str, ...]:
    """The architectures with a recipe for data set ``name`` (default first), or for any."""
    return tuple(dict.fromkeys(a for n, a in RECIPES if name is None or n == name))


def get(name: str, architecture: str | None = None) -> Recipe:
    """The recipe of data set ``name`` with ``architecture`` (None: the data set's default).

    Raises:
        ValueError: no recipe for this data set, or none with this architecture.
    """
    available = architectures(name)
    if not available:
        raise ValueError(f"no recipe for data {name!r}; choose one of: {', '.join(names())}")
    if architecture is None:
        architecture = available[0]
    if architecture not in available:
        raise ValueError(
            f"{name} has recipes for architecture(s) {', '.join(available)}, not {architecture!r}"
        )
    return RECIPES[name, architecture]
