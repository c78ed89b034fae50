r"""FFJORD's multiscale CNF for images (Grathwohl et al. 2019, after Real NVP's multiscale design).

Data to base, for ``scales = n``:

1. the logit transform (:class:`cnf.transforms.LogitTransform`; omitted with ``alpha=None``);
2. at each scale ``i < n - 1``, on the current shape ``(c, h, w)``: ``blocks_per_scale`` CNF
   blocks, a squeeze to ``(4c, h/2, w/2)``, ``blocks_per_scale`` CNF blocks on that, then the
   second half of the channels, ``(2c, h/2, w/2)``, is factored out (it goes to the base
   distribution unchanged) and the first half carries on;
3. the last scale: ``blocks_per_scale`` CNF blocks on everything that is left.

This is FFJORD's ``ODENVP`` (``lib/odenvp.py``): a non-final scale holds ``2 * blocks_per_scale``
CNF blocks, the last one ``blocks_per_scale``. Each block is a :class:`cnf.flow.CNF` with a
:class:`cnf.fields.ConcatSquashConvNet` field (FFJORD's multiscale runs use ``concat`` layers;
ConcatSquash gates them by time as its other models do).

Packing of the latent: every squeeze and split is a permutation, so the latent has as many
entries as the data, and :meth:`~cnf.flow.Flow.transform` returns it as one tensor of the
data's shape ``(batch, C, H, W)`` by undoing the data-side rearrangements: at each non-final
scale the kept half's latent (itself packed the same way) and the factored-out half are
concatenated along channels, ``cat([kept, factored], 1)`` (the order they were split in), and
unsqueezed back to ``(c, h, w)`` (:func:`torch.nn.functional.pixel_shuffle`). Each latent
entry thus sits at the pixel it was squeezed from. The base is the standard normal over
``(C, H, W)`` and :meth:`~cnf.flow.Flow.inverse` unpacks the same way.

Solver settings passed per call (``log_prob(x, trace="exact")``) reach every block, and
:meth:`~cnf.flow.Flow.evaluate` ``(x, regularizers=True)`` sums the RNODE regularizers over
all blocks; ``stats`` lists every block's solve in the order run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .context import conditional_field
from .continuous import CNFTransform
from .fields import ConcatSquashConvNet
from .flow import Flow
from .settings import Call, SolverSettings
from .transforms import FlowOutput, LogitTransform, Squeeze, Transform, image_shape

__all__ = [
    "MultiscaleCNF",
    "MultiscaleTransform",
    "cifar10_model",
    "digits_model",
    "max_scales",
    "mnist_model",
]


def max_scales(event_shape: Sequence[int]) -> int:
    """The most scales an image shape allows, FFJORD's rule made safe for odd sizes.

    Scales are added while the image can be squeezed (even height and width) and the squeezed
    height and width are still at least 4: 2 for 8x8, 3 for 28x28 (28, 14, 7), 4 for 32x32.
    """
    _, h, w = image_shape(event_shape)
    n = 1
    while h % 2 == 0 and w % 2 == 0 and h // 2 >= 4 and w // 2 >= 4:
        n, h, w = n + 1, h // 2, w // 2
    return n


def _check_scales(shape: torch.Size, scales, single_scale: bool) -> int:
    if single_scale:
        if scales not in (None, 1):
            raise ValueError(f"single_scale=True means scales=1, but scales={scales!r}")
        scales = 1
    if scales is None:
        scales = max_scales(shape)
    if isinstance(scales, bool) or not isinstance(scales, int) or scales < 1:
        raise ValueError(f"scales must be a positive int or None, got {scales!r}")
    _, h, w = shape
    for i in range(scales - 1):
        if h % 2 or w % 2:
            raise ValueError(
                f"{scales} scales need {scales - 1} squeezes, but scale {i} has the odd size "
                f"{h}x{w}; use scales <= {i + 1} (max_scales gives the most this image allows)"
            )
        h, w = h // 2, w // 2
    return scales


class MultiscaleTransform(Transform):
    """The multiscale architecture as one transform (see the module docstring).

    Args:
        event_shape: image shape ``(C, H, W)``.
        scales: number of scales, already checked.
        make_blocks: ``make_blocks(shape) -> list of CNF blocks`` acting on ``shape``.
        alpha: the logit transform's ``alpha``, or None for none.

    Attributes:
        logit, pre, post, squeezes: as for :class:`MultiscaleCNF`.
    """

    def __init__(self, event_shape: Sequence[int], scales: int, make_blocks, alpha):
        super().__init__()
        shape = image_shape(event_shape)
        self.in_shape = self.out_shape = shape
        self.scales, self.alpha = scales, alpha
        self.logit = None if alpha is None else LogitTransform(shape, alpha)
        self.pre, self.post, self.squeezes = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c, h, w = shape
        for i in range(scales):
            self.pre.append(nn.ModuleList(make_blocks((c, h, w))))
            if i < scales - 1:
                squeeze = Squeeze((c, h, w))
                self.squeezes.append(squeeze)
                self.post.append(nn.ModuleList(make_blocks(tuple(squeeze.out_shape))))
                c, h, w = 2 * c, h // 2, w // 2

    @property
    def blocks(self) -> list[CNFTransform]:
        """Every CNF block, in the order data-to-base passes run them."""
        out = []
        for i in range(self.scales):
            out += list(self.pre[i])
            if i < self.scales - 1:
                out += list(self.post[i])
        return out

    def forward_and_logdet(self, x: Tensor, call: Call) -> FlowOutput:
        total = FlowOutput.identity(x)
        if self.logit is not None:
            total = total.then(self.logit.forward_and_logdet(x, call))
        factored = []
        for i in range(self.scales):
            steps = list(self.pre[i])
            if i < self.scales - 1:
                steps += [self.squeezes[i], *self.post[i]]
            for step in steps:
                total = total.then(step.forward_and_logdet(total.z, call))
            if i < self.scales - 1:
                kept, out = _halves(total.z)  # the second half leaves for the base
                factored.append(out)
                total.z = kept
        # pack the latent in the data's shape: undo every split and squeeze
        for squeeze, out in zip(reversed(self.squeezes), reversed(factored)):
            total.z = squeeze.inverse_and_logdet(torch.cat([total.z, out], 1), call).z
        return total

    def inverse_and_logdet(self, z: Tensor, call: Call) -> FlowOutput:
        factored = []
        for squeeze in self.squeezes:
            z, out = _halves(squeeze.forward_and_logdet(z, call).z)
            factored.append(out)
        total = FlowOutput.identity(z)
        for i in reversed(range(self.scales)):
            steps = list(self.pre[i])
            if i < self.scales - 1:
                total.z = torch.cat([total.z, factored[i]], 1)
                steps += [self.squeezes[i], *self.post[i]]
            for step in reversed(steps):
                total = total.then(step.inverse_and_logdet(total.z, call))
        if self.logit is not None:
            total = total.then(self.logit.inverse_and_logdet(total.z, call))
        return total


def _halves(z: Tensor) -> tuple[Tensor, Tensor]:
    """The channel halves of ``(batch, C, H, W)`` (``split``: ``chunk`` of an empty batch
    returns one piece, not two)."""
    return z.split(z.shape[1] // 2, dim=1)


class MultiscaleCNF(Flow):
    r"""FFJORD's multiscale continuous normalizing flow on images (see the module docstring).

    ``Flow(MultiscaleTransform(...))`` with ConcatSquash conv fields.

    Args:
        event_shape: image shape ``(C, H, W)``.
        scales: number of scales (1: a single scale, CNF blocks on the whole image); None: as
            many as the image allows (:func:`max_scales`). Each of the ``scales - 1`` squeezes
            needs an even height and width.
        blocks_per_scale: CNF blocks before and after each squeeze (FFJORD's ``num_blocks``).
        hidden_channels: hidden channels of every block's :class:`ConcatSquashConvNet`.
        activation: the fields' activation (FFJORD: softplus).
        alpha: the logit transform's ``alpha`` (applied first; the data must be in ``[0, 1]``);
            None: no logit transform (the data are used as they are).
        T, train_T: each block's integration time, learned by default (FFJORD's choice).
        zero_init_last: start every field at zero, so the model starts as the logit transform
            followed by the identity.
        single_scale: shorthand for ``scales=1`` (FFJORD's non-multiscale option without the
            down/up-sampling inside the field).
        context: a class-conditional (or otherwise conditional) model: the keywords of
            :class:`cnf.context.ContextEmbedding` (e.g. ``{"classes": 10}``); every block's conv
            field reads the embedded context in its gates and shifts (FiLM), one embedding per
            block. None: unconditional.
        **settings: every block's :class:`~cnf.settings.SolverSettings` (default here:
            ``trace="hutchinson"``, for training; the exact trace of a conv field costs one
            vectorised backward pass per dimension of the block's state, fine for 8x8 digits);
            all can be overridden per call.

    Attributes:
        logit: the :class:`LogitTransform`, or None.
        pre, post: per scale, the CNF blocks before and after the squeeze (``post`` has
            ``scales - 1`` entries).
        squeezes: the :class:`Squeeze` of each non-final scale.
        blocks: every CNF block, in the data-to-base order.

    Example:
        >>> model = MultiscaleCNF((1, 8, 8), hidden_channels=(8, 8), alpha=0.05)
        >>> z, logdet = model.transform(torch.rand(2, 1, 8, 8))
        >>> tuple(z.shape), len(model.blocks)
        ((2, 1, 8, 8), 6)
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        *,
        scales: int | None = None,
        blocks_per_scale: int = 2,
        hidden_channels: Sequence[int] = (64, 64, 64),
        activation: str = "softplus",
        alpha: float | None = 1e-6,
        T: float = 1.0,
        train_T: bool = True,
        zero_init_last: bool = False,
        single_scale: bool = False,
        context: dict | None = None,
        **settings,
    ):
        shape = image_shape(event_shape)
        scales = _check_scales(shape, scales, single_scale)
        n = blocks_per_scale
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"blocks_per_scale must be a positive int, got {n!r}")
        solver = SolverSettings(**{"trace": "hutchinson", **settings})

        def make_blocks(shape: tuple[int, int, int]) -> list[CNFTransform]:
            def field():
                return conditional_field(
                    lambda c: ConcatSquashConvNet(
                        shape[0],
                        hidden_channels,
                        activation,
                        context_features=c,
                        zero_init_last=zero_init_last,
                    ),
                    context,
                )

            return [
                CNFTransform(field(), shape, T=T, train_T=train_T, settings=solver)
                for _ in range(n)
            ]

        super().__init__(MultiscaleTransform(shape, scales, make_blocks, alpha))

    scales = property(lambda self: self.transform.scales, doc="Number of scales.")
    alpha = property(lambda self: self.transform.alpha, doc="The logit's alpha, or None.")
    logit = property(lambda self: self.transform.logit, doc="The logit step, or None.")
    pre = property(lambda self: self.transform.pre, doc="Blocks before each squeeze.")
    post = property(lambda self: self.transform.post, doc="Blocks after each squeeze.")
    squeezes = property(lambda self: self.transform.squeezes, doc="The squeezes.")
    blocks = property(lambda self: self.transform.blocks, doc="Every CNF block, in order.")

    def extra_repr(self) -> str:
        return f"event_shape={tuple(self.event_shape)}, scales={self.scales}, alpha={self.alpha}"


def digits_model(**kw) -> MultiscaleCNF:
    """A small multiscale CNF for scikit-learn's 8x8 digits, ``(1, 8, 8)``, that trains on a CPU.

    Two scales with one block before and after the squeeze (3 CNF blocks: on ``(1, 8, 8)``,
    ``(4, 4, 4)`` and ``(2, 4, 4)``), ConcatSquash conv fields with 32-32-32 channels,
    softplus, logit ``alpha = 0.05`` (the 17-level digits are coarse, like CIFAR's rather than
    MNIST's near-binary pixels), Hutchinson (Rademacher) for training, dopri5 at
    ``rtol = atol = 1e-5``, adjoint gradients, learned ``T`` starting at 1. ``kw`` overrides any
    :class:`MultiscaleCNF` argument.
    """
    args = dict(
        event_shape=(1, 8, 8),
        scales=2,
        blocks_per_scale=1,
        hidden_channels=(32, 32, 32),
        activation="softplus",
        alpha=0.05,
    )
    return MultiscaleCNF(**{**args, **kw})


def _ffjord_model(shape: tuple[int, int, int], alpha: float, kw: dict) -> MultiscaleCNF:
    """FFJORD's image setting on ``shape`` with logit ``alpha``; ``kw`` overrides any argument."""
    args = dict(
        event_shape=shape,
        scales=None,
        blocks_per_scale=2,
        hidden_channels=(64, 64, 64),
        activation="softplus",
        alpha=alpha,
    )
    return MultiscaleCNF(**{**args, **kw})


def mnist_model(**kw) -> MultiscaleCNF:
    """FFJORD's MNIST model, ``(1, 28, 28)``.

    The paper's setting (``train_cnf.py --data mnist --dims 64,64,64 --num_blocks 2
    --multiscale True --rademacher True``): 3 scales (28, 14, 7), 2 blocks per scale before and
    after each squeeze (10 CNF blocks), 64-64-64 channels, softplus, logit ``alpha = 1e-6``,
    learned ``T`` starting at 1, Hutchinson with Rademacher probes, dopri5 at
    ``rtol = atol = 1e-5``, adjoint gradients. ``kw`` overrides any :class:`MultiscaleCNF`
    argument.
    """
    return _ffjord_model((1, 28, 28), 1e-6, kw)


def cifar10_model(**kw) -> MultiscaleCNF:
    """FFJORD's CIFAR-10 model, ``(3, 32, 32)``.

    As :func:`mnist_model` with 4 scales (32, 16, 8, 4; 14 CNF blocks) and logit
    ``alpha = 0.05``. ``kw`` overrides any :class:`MultiscaleCNF` argument.
    """
    return _ffjord_model((3, 32, 32), 0.05, kw)
