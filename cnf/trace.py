r"""Divergence of a vector field: exact, field-aware exact, and Hutchinson's estimator.

A continuous normalizing flow carries the log-density along with the state,

.. math::

    \frac{dz}{dt} = f(t, z), \qquad \frac{d \log p(z(t))}{dt} = -\operatorname{tr}
    \frac{\partial f}{\partial z},

so every evaluation of the field also needs the trace of its Jacobian. Here ``z`` has shape
``(batch, *event_shape)``, the batch elements are independent, and :math:`D` is the number of
entries of one event. Every function returns ``f`` together with the divergence, evaluating the
field once.

* :func:`divergence_exact`: the exact trace. For a field with a ``forward_with_divergence(t, z)``
  method (:class:`cnf.fields.ConcatSquashMLP`) that method computes it analytically; otherwise
  the field is evaluated once and one vector-Jacobian product is vectorised with
  :func:`torch.func.vmap` over chunks of the :math:`D` basis vectors (not a Python loop of
  :math:`D` ``autograd.grad`` calls, as FFJORD does), reading only the Jacobian's diagonal;
  while training with :math:`D \le` :data:`LOOP_DIMS`, where the loop is faster, it loops.
* :func:`divergence_hutchinson`: the unbiased estimate :math:`\frac1K \sum_k e_k^\top J e_k` from
  :math:`K` probes, one (vectorised) vector-Jacobian product.
* :func:`divergence`: one call per solver stage for the CNF, optionally with the estimate of
  :math:`\|J\|_F^2` for the RNODE regularizer (Finlay et al. 2020).

Noise comes from :func:`sample_noise` and is always passed in: the caller draws it once per solve
and holds it fixed across the solver's steps (and its backward pass); nothing is cached here.

Graphs: the results are differentiable with respect to ``z`` and the field's parameters exactly
when autograd is recording (``torch.is_grad_enabled()``), i.e. the trace is computed with
``create_graph`` semantics while training and without keeping any graph under
``torch.no_grad()``. ``z`` need not require gradients. Generic fields must be usable with
:mod:`torch.func` (no in-place updates of captured tensors, no ``.item()`` on the state).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .shards import draw_rows

__all__ = [
    "CHUNK_ROWS",
    "ESTIMATORS",
    "LOOP_DIMS",
    "NOISE_KINDS",
    "Divergence",
    "divergence",
    "divergence_exact",
    "divergence_hutchinson",
    "sample_noise",
]

ESTIMATORS = ("exact", "hutchinson")
"""Names accepted by :func:`divergence`'s ``estimator``."""

NOISE_KINDS = ("rademacher", "gaussian")
"""Names accepted by :func:`sample_noise`'s ``kind``."""

Field = Callable[[Tensor, Tensor], Tensor]


class Divergence(NamedTuple):
    """Result of :func:`divergence`.

    Attributes:
        f: ``dz/dt = f(t, z)``, shape ``(batch, *event_shape)``.
        div: :math:`\\operatorname{tr}(\\partial f / \\partial z)` (exact or estimated), shape
            ``(batch,)``.
        frobenius: the probe estimate of :math:`\\|\\partial f / \\partial z\\|_F^2`, shape
            ``(batch,)``; None unless ``frobenius=True`` was asked for.
    """

    f: Tensor
    div: Tensor
    frobenius: Tensor | None


def sample_noise(
    shape: Sequence[int],
    kind: str = "rademacher",
    *,
    probes: int = 1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Draw probe vectors for Hutchinson's estimator (and the Frobenius-norm estimate).

    Both kinds have :math:`E[e e^\top] = I`, which makes :math:`e^\top J e` an unbiased estimate of
    :math:`\operatorname{tr} J` and :math:`\|e^\top J\|^2` one of :math:`\|J\|_F^2`. Rademacher
    probes (entries :math:`\pm 1`) have the smaller variance for the trace,
    :math:`2 \sum_{i \ne j} J_{ij}^2` against Gaussian's :math:`2 \|J\|_F^2` for symmetric J.

    Draw once per solve and pass the same tensor to every evaluation of the solve (and of its
    backward pass): the estimator is then one fixed linear functional of the Jacobian along the
    trajectory, which keeps the ODE smooth for the adaptive solver.

    Args:
        shape: shape of the state, ``(batch, *event_shape)``.
        kind: ``"rademacher"`` or ``"gaussian"``.
        probes: number :math:`K` of probes per sample.
        generator: random generator (on ``device``) for reproducible draws.
        dtype, device: of the noise; use the state's (default: PyTorch's defaults).

    Returns:
        noise of shape ``(probes, *shape)``.

    Raises:
        ValueError: unknown ``kind`` or ``probes`` not a positive int.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> e = sample_noise((128, 2), "rademacher", probes=4, generator=gen)
        >>> e.shape, bool(((e == 1) | (e == -1)).all())
        (torch.Size([4, 128, 2]), True)
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid kinds: {list(NOISE_KINDS)}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive int, got {probes!r}")
    if dtype is None:
        dtype = torch.get_default_dtype()

    def draw(rows: int) -> Tensor:
        size = (probes, rows, *shape[1:])
        if kind == "gaussian":
            return torch.randn(size, generator=generator, dtype=dtype, device=device)
        bits = torch.randint(0, 2, size, generator=generator, device=device)
        return (2 * bits - 1).to(dtype)

    if len(shape) == 0:
        return draw(1)[:, 0]
    # a data-parallel process draws the whole batch's probes and keeps its rows (cnf.shards)
    return draw_rows(draw, shape[0], dim=1)


def _check_state(z: Tensor) -> None:
    if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() < 1:
        raise ValueError(
            "z must be a floating-point tensor of shape (batch, *event_shape), got "
            f"{type(z).__name__ if not isinstance(z, Tensor) else f'{z.dtype} {tuple(z.shape)}'}"
        )


def _check_noise(noise: Tensor | None, z: Tensor) -> Tensor:
    """Noise as ``(probes, *z.shape)``; accepts ``z.shape`` for one probe."""
    if noise is None:
        raise ValueError(
            "this estimate needs probe noise: pass noise=sample_noise(z.shape, ...), drawn once "
            "per solve"
        )
    if not isinstance(noise, Tensor):
        raise ValueError(f"noise must be a tensor, got {type(noise).__name__}")
    if noise.shape == z.shape:
        noise = noise.unsqueeze(0)
    if noise.dim() != z.dim() + 1 or noise.shape[1:] != z.shape or noise.shape[0] < 1:
        raise ValueError(
            f"noise must have shape (probes, {', '.join(map(str, z.shape))}) or the state's shape "
            f"{tuple(z.shape)}, got {tuple(noise.shape)}"
        )
    if noise.dtype != z.dtype or noise.device != z.device:
        raise ValueError(
            f"noise has dtype {noise.dtype} on {noise.device} but z has dtype {z.dtype} on "
            f"{z.device}; draw it with sample_noise(..., dtype=z.dtype, device=z.device)"
        )
    return noise


def _check_output(f: Tensor, z: Tensor) -> None:
    if not isinstance(f, Tensor) or f.shape != z.shape or f.dtype != z.dtype:
        got = f"{f.dtype} {tuple(f.shape)}" if isinstance(f, Tensor) else type(f).__name__
        raise ValueError(
            f"field(t, z) must return dz/dt of z's shape {tuple(z.shape)} and dtype {z.dtype}, "
            f"got {got}"
        )


def _per_sample(x: Tensor) -> Tensor:
    """Sum over the event dimensions: ``(batch, *event_shape) -> (batch,)``."""
    # the event size is spelled out: ``-1`` cannot be inferred for an empty batch
    return x.reshape(x.shape[0], math.prod(x.shape[1:])).sum(1)


def _probe_forms(
    vjp_fn: Callable, probes: Tensor, chunk_size: int | None, squares: bool
) -> tuple[Tensor, Tensor | None]:
    r""":math:`e^\top J e` and (if ``squares``) :math:`\|e^\top J\|^2`, each ``(probes, batch)``."""

    def forms(e: Tensor) -> tuple[Tensor, ...]:
        (ej,) = vjp_fn(e)
        return (_per_sample(ej * e), _per_sample(ej * ej)) if squares else (_per_sample(ej * e),)

    if probes.shape[0] == 1:  # spares vmap's overhead in the common one-probe case
        out = tuple(x.unsqueeze(0) for x in forms(probes[0]))
    else:
        out = torch.func.vmap(forms, chunk_size=chunk_size)(probes)
    return out[0], out[1] if squares else None


CHUNK_ROWS = 2048
"""Default bound on ``chunk * batch``, the rows of one vectorised chunk of basis vectors.

The generic exact trace runs one vector-Jacobian product vectorised over a chunk of basis
vectors, i.e. one backward pass over ``chunk * batch`` rows. Measured on one CPU thread with an
MLP of width 64 (batch 256, D = 8, 32, 128), chunks of 2048 rows were the fastest: smaller ones
pay more per-call overhead, larger ones (8192-32768 rows) ran up to 1.5x slower, their
temporaries no longer fitting in a core's cache. It also bounds a chunk's memory by that of a
backward pass over a batch of 2048 samples, whatever ``D`` (images).
"""


def _vjp(fn: Callable, z: Tensor, probes: int, has_aux: bool = False):
    """``torch.func.vjp(fn, z, has_aux=...)``, by plain autograd for one probe while a graph
    is being built (training).

    Training records the graph anyway, and plain autograd leaves it open to saved-tensor
    hooks, which ``torch.func`` refuses: the checkpoint adjoint measures its graph with one
    (:mod:`cnf.ode._keep`), and keeps it only if it can. Several probes are vectorised with
    :func:`torch.func.vmap`, which needs ``torch.func``'s own product, as do transformed inputs.
    """
    if not _plain(z, probes):
        return torch.func.vjp(fn, z, has_aux=has_aux)
    x = z if z.requires_grad else z.detach().requires_grad_(True)
    out = fn(x)
    f, aux = out if has_aux else (out, None)

    def vjp_fn(e: Tensor) -> tuple[Tensor]:
        if not f.requires_grad:  # f does not depend on x (nor on any parameter)
            return (torch.zeros_like(x),)
        (g,) = torch.autograd.grad(f, x, e, create_graph=True, retain_graph=True, allow_unused=True)
        return (torch.zeros_like(x) if g is None else g,)

    return (f, vjp_fn, aux) if has_aux else (f, vjp_fn)


def _plain(z: Tensor, probes: int) -> bool:
    """Whether :func:`_vjp` takes plain autograd: one probe, a graph being recorded, ``z`` not
    under a ``torch.func`` transform. Its product is then not vmappable."""
    return probes == 1 and torch.is_grad_enabled() and not _transformed(z)


def _transformed(x: Tensor) -> bool:
    """Whether ``x`` is wrapped by a ``torch.func`` transform (vmap, grad, ...)."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return True if check is None else bool(check(x))


def _check_chunk(chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _chunk(chunk_size: int | None, batch: int, d: int) -> int:
    """Basis vectors per chunk: ``chunk_size`` or as many as fit :data:`CHUNK_ROWS`."""
    if chunk_size is None:
        return max(1, min(d, CHUNK_ROWS // max(1, batch)))
    return chunk_size


LOOP_DIMS = 8
"""Up to this many dimensions, a differentiable generic exact trace is a loop of one
vector-Jacobian product per basis vector by plain autograd, FFJORD's way, not the vectorised
product: measured on one thread (MLP of width 64, batch 256, D = 8), the loop's graph and
backward cost 0.84x the vectorised one's; from D = 32 on, the vectorised product is faster.
Plain autograd also leaves the graph measurable by the checkpoint adjoint (:mod:`cnf.ode._keep`).
"""


def _loop_trace(vjp_fn: Callable, z: Tensor) -> Tensor:
    r""":math:`\sum_i (e_i^\top J)_i`, one vector-Jacobian product per basis vector."""
    batch = z.shape[0]
    d = math.prod(z.shape[1:])
    div = z.new_zeros(batch)
    for i in range(d):
        e = z.new_zeros(batch, d)
        e[:, i] = 1.0
        (ej,) = vjp_fn(e.reshape(z.shape))
        div = div + ej.reshape(batch, d)[:, i]
    return div


def _basis_trace(vjp_fn: Callable, z: Tensor, chunk_size: int | None) -> Tensor:
    r""":math:`\sum_i (e_i^\top J)_i` over the :math:`D` basis vectors, shape ``(batch,)``.

    One vector-Jacobian product is vectorised (:func:`torch.func.vmap`) over a chunk of
    :math:`c` basis vectors at a time, each broadcast over the batch; of the rows
    :math:`e_i^\top J` of shape ``(c, batch, D)`` only the diagonal entries :math:`J_{ii}` are
    read, so nothing of size :math:`D^2` per sample is multiplied or summed.
    """
    batch, event = z.shape[0], z.shape[1:]
    d = math.prod(event)
    eye = torch.eye(d, dtype=z.dtype, device=z.device)

    def row(e: Tensor) -> Tensor:
        (ej,) = vjp_fn(e.reshape(1, *event).expand(batch, *event))
        return ej

    rows = torch.func.vmap(row)
    chunk = _chunk(chunk_size, batch, d)
    div = None
    for start in range(0, d, chunk):
        stop = min(d, start + chunk)
        ej = rows(eye[start:stop]).reshape(stop - start, batch, d)[:, :, start:stop]
        part = torch.diagonal(ej, dim1=0, dim2=2).sum(-1)  # sum_i J_ii over this chunk
        div = part if div is None else div + part
    return z.new_zeros(batch) if div is None else div


def _has_field_method(field) -> bool:
    return callable(getattr(field, "forward_with_divergence", None))


def _exact(
    field: Field,
    t: Tensor,
    z: Tensor,
    noise: Tensor | None,
    field_aware: bool,
    chunk_size: int | None,
) -> Divergence:
    """Exact divergence; with ``noise``, also the Frobenius estimate from those probes."""
    _check_chunk(chunk_size)
    if field_aware and _has_field_method(field):
        if noise is None:
            f, div = field.forward_with_divergence(t, z)
            _check_output(f, z)
            return Divergence(f, div, None)
        f, vjp_fn, div = _vjp(
            lambda x: field.forward_with_divergence(t, x), z, noise.shape[0], has_aux=True
        )
        _check_output(f, z)
        _, sq = _probe_forms(vjp_fn, noise, chunk_size, True)
        return Divergence(f, div, sq.mean(0))
    probes = 1 if noise is None else noise.shape[0]
    small = chunk_size is None and math.prod(z.shape[1:]) <= LOOP_DIMS
    if small and _plain(z, probes):  # training: a loop of plain autograd products
        f, vjp_fn = _vjp(lambda x: field(t, x), z, probes)
        _check_output(f, z)
        div = _loop_trace(vjp_fn, z)
    else:
        f, vjp_fn = torch.func.vjp(lambda x: field(t, x), z)
        _check_output(f, z)
        div = _basis_trace(vjp_fn, z, chunk_size)
    if noise is None:
        return Divergence(f, div, None)
    # the probes need whole rows e^T J, not diagonals: their own (small) vectorised product
    _, sq = _probe_forms(vjp_fn, noise, chunk_size, True)
    return Divergence(f, div, sq.mean(0))


def _hutchinson(
    field: Field, t: Tensor, z: Tensor, noise: Tensor, frobenius: bool, chunk_size: int | None
) -> Divergence:
    _check_chunk(chunk_size)
    f, vjp_fn = _vjp(lambda x: field(t, x), z, noise.shape[0])
    _check_output(f, z)
    quad, sq = _probe_forms(vjp_fn, noise, chunk_size, frobenius)
    return Divergence(f, quad.mean(0), sq.mean(0) if frobenius else None)


def divergence_exact(
    field: Field,
    t: Tensor,
    z: Tensor,
    *,
    field_aware: bool = True,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Evaluate ``f(t, z)`` and its exact divergence :math:`\operatorname{tr} J`, J = df/dz.

    If ``field`` has a method ``forward_with_divergence(t, z) -> (f, div)`` (as
    :class:`cnf.fields.ConcatSquashMLP` does) and ``field_aware`` is True, that method computes
    the trace analytically; both ways give the same value to rounding. Otherwise the field is
    evaluated once with :func:`torch.func.vjp` and the vector-Jacobian product is vectorised over
    the :math:`D` basis vectors :math:`e_i` (broadcast over the batch),

    .. math::

        \operatorname{tr} J = \sum_{i=1}^{D} e_i^\top J e_i,

    which costs about :math:`D` backward passes, done as a few batched passes over chunks of
    ``chunk_size`` basis vectors; only the diagonal entries :math:`(e_i^\top J)_i` are read.
    A chunk's memory is about that of ``chunk_size`` backward passes; by default a chunk holds
    ``chunk_size * batch <=`` :data:`CHUNK_ROWS` rows (at least one basis vector), which keeps
    it fast (cache-sized) and bounds memory for large events (images).

    Args:
        field: ``field(t, z) -> dz/dt`` of ``z``'s shape; batch elements must be independent.
        t: scalar time, passed to ``field`` unchanged.
        z: state of shape ``(batch, *event_shape)``; need not require gradients.
        field_aware: use the field's ``forward_with_divergence`` when it has one.
        chunk_size: basis vectors per vectorised chunk (default: from
            :data:`CHUNK_ROWS`, see above).

    Returns:
        ``(f, div)`` with ``f`` of shape ``(batch, *event_shape)`` and ``div`` of shape
        ``(batch,)``; differentiable when autograd is recording (see the module docstring).

    Raises:
        ValueError: ``chunk_size`` neither None nor a positive int.

    Example:
        >>> from cnf.fields import ConcatSquashMLP
        >>> f, div = divergence_exact(ConcatSquashMLP(2), torch.tensor(0.0), torch.randn(5, 2))
        >>> f.shape, div.shape
        (torch.Size([5, 2]), torch.Size([5]))
    """
    _check_state(z)
    f, div, _ = _exact(field, t, z, None, field_aware, chunk_size)
    return f, div


def divergence_hutchinson(
    field: Field, t: Tensor, z: Tensor, noise: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Evaluate ``f(t, z)`` and Hutchinson's estimate of its divergence.

    .. math::

        \widehat{\operatorname{tr}} J = \frac1K \sum_{k=1}^{K} e_k^\top J e_k,
        \qquad E[e e^\top] = I,

    with one vector-Jacobian product per probe, the :math:`K` probes vectorised together.

    Args:
        field: ``field(t, z) -> dz/dt`` of ``z``'s shape; batch elements must be independent.
        t: scalar time, passed to ``field`` unchanged.
        z: state of shape ``(batch, *event_shape)``; need not require gradients.
        noise: probes of shape ``(K, batch, *event_shape)``, or ``(batch, *event_shape)`` for one,
            from :func:`sample_noise`, with ``z``'s dtype and device.

    Returns:
        ``(f, div)`` with ``f`` of shape ``(batch, *event_shape)`` and ``div`` of shape
        ``(batch,)``.

    Raises:
        ValueError: ``noise`` of the wrong shape, dtype or device.
    """
    _check_state(z)
    noise = _check_noise(noise, z)
    f, div, _ = _hutchinson(field, t, z, noise, False, None)
    return f, div


def divergence(
    field: Field,
    t: Tensor,
    z: Tensor,
    *,
    estimator: str = "exact",
    noise: Tensor | None = None,
    frobenius: bool = False,
    field_aware: bool = True,
    chunk_size: int | None = None,
) -> Divergence:
    r"""Everything the CNF's joint ODE needs from one evaluation of the field.

    Returns ``f``, the divergence (``estimator="exact"``: :func:`divergence_exact`;
    ``"hutchinson"``: :func:`divergence_hutchinson` with ``noise``) and, with ``frobenius=True``,
    the RNODE estimate of the squared Frobenius norm of the Jacobian from the same probes,

    .. math::

        \widehat{\|J\|_F^2} = \frac1K \sum_{k=1}^{K} \|e_k^\top J\|^2 .

    The Frobenius estimate always uses the probes in ``noise``, whichever the estimator:

    * Hutchinson: it reuses the vector-Jacobian products of the trace (no extra cost);
    * exact, generic field: one extra vector-Jacobian product (K probes vectorised);
    * exact, field-aware: one extra vector-Jacobian product (K probes vectorised).

    Args:
        field, t, z: as for :func:`divergence_exact`.
        estimator: ``"exact"`` or ``"hutchinson"``.
        noise: probes ``(K, batch, *event_shape)`` or ``(batch, *event_shape)`` from
            :func:`sample_noise`; required for ``"hutchinson"`` and for ``frobenius=True``,
            ignored otherwise.
        frobenius: also return the Frobenius-norm estimate (else ``frobenius`` is None).
        field_aware, chunk_size: as for :func:`divergence_exact` (and chunking the probes).

    Returns:
        :class:`Divergence` ``(f, div, frobenius)``, shapes ``(batch, *event_shape)``,
        ``(batch,)`` and ``(batch,)`` (or None).

    Raises:
        ValueError: unknown estimator; ``noise`` missing or of the wrong shape, dtype or device;
            ``chunk_size`` as for :func:`divergence_exact`.

    Example:
        >>> from cnf.fields import ConcatSquashMLP
        >>> z = torch.randn(5, 2)
        >>> e = sample_noise(z.shape, "gaussian")
        >>> field = ConcatSquashMLP(2)
        >>> f, div, frob = divergence(field, torch.tensor(0.0), z, noise=e, frobenius=True)
        >>> div.shape, frob.shape
        (torch.Size([5]), torch.Size([5]))
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid estimators: {list(ESTIMATORS)}")
    _check_state(z)
    if estimator == "hutchinson":
        return _hutchinson(field, t, z, _check_noise(noise, z), frobenius, chunk_size)
    noise = _check_noise(noise, z) if frobenius else None
    return _exact(field, t, z, noise, field_aware, chunk_size)
