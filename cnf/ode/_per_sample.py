"""Per-sample steps (``options["steps"] == "sample"``): every sample of a batch steps on its own.

Each sample ``i`` of a state batched on its first dimension carries its own time ``t_i``,
step size ``h_i``, PI-controller memory and accept/reject decision; its error is its own RMS
of the scaled error (the largest over the state's tensors), so its steps are those it would
take solved alone. One batched call of ``func`` serves all samples still running: ``func``
receives ``t`` of shape ``(m,)`` (one time per row, in the state's dtype) and the ``m`` rows
still running, in the state's structure. A sample that reaches the final time leaves the batch
(the rows are compacted), so it stops costing evaluations.

The steps reuse the generic Runge-Kutta step (:func:`cnf.ode._rk.rk_step`) with every stage
scaled by its row's step, ``K_i = h_r k_i``: the step is then ``rk_step`` with ``h = 1`` and
stage times ``t_r + c_i h_r``. Output times are read per sample by the tableau's dense output
at the sample's own ``theta`` (:func:`cnf.ode._rk.dense_output_rows`).

Per step the loop reads one boolean from the device: whether any sample finished, passed an
output time or ran into trouble (step-size underflow, ``max_num_steps``). Everything else
stays in tensors: times and step sizes are float64 tensors, one entry per running sample.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import Tensor

from ._agree import current_reduce
from ._control import Config
from ._errors import SolverError, describe_non_finite
from ._integrate import Counts
from ._problem import Problem, describe_result
from ._rk import dense_output_rows, rk_step
from ._time import attach_time_gradient

__all__ = ["solve_per_sample"]

# as the shared controller: a step ending within this fraction of a step before the final
# time ends on it instead
LANDING_SLACK = 1e-9
# steps between checks for step-size underflow and max_num_steps (a stuck sample is caught a
# few steps late, and the other steps skip two tensor operations)
CHECK_EVERY = 8


def solve_per_sample(problem: Problem, cfg: Config) -> tuple[Tensor, Counts]:
    """The solution ``(T, *y0.shape)`` (the problem's layout) and the counts, by per-sample
    steps; backpropagation reaches ``y0``, ``func``'s parameters and ``t``."""
    if current_reduce() is not None:
        raise ValueError(
            "options['steps']='sample' cannot agree on steps across data-parallel processes "
            "(agreeing_norms): every sample steps on its own; use steps='shared' there"
        )
    if cfg.callbacks is not None:
        raise ValueError(
            "func's step callbacks take one time and step for the whole batch; per-sample "
            "steps (options['steps']='sample') have one per sample: use steps='shared'"
        )
    solver = PerSampleSolver(problem, cfg)
    if torch.is_grad_enabled() and problem.t.requires_grad:
        return attach_time_gradient(_with_batched_times(problem), solver.run)
    return solver.run(problem.y0)


def _with_batched_times(problem: Problem) -> Problem:
    """``problem`` whose ``rhs(t, y)`` hands ``func`` the time once per sample (the gradient
    with respect to ``t`` evaluates ``func`` at the output times on the whole batch)."""
    layout, batch = RowLayout(problem), problem.shapes[0][0]

    def rhs(t: float, y: Tensor) -> Tensor:
        tt = torch.full((batch,), t, dtype=problem.dtype, device=problem.device)
        out = layout.checked(problem.func(tt, problem.to_user(y)), batch)
        return torch.cat([o.reshape(-1) for o in out]) if problem.is_tuple else out

    shim = copy.copy(problem)
    shim.rhs = rhs
    return shim


class RowLayout:
    """The state as rows: a single tensor ``(B, ...)`` as it is, a tuple's tensors packed into
    ``(B, D)`` (each sample's entries of every tensor, side by side)."""

    def __init__(self, problem: Problem) -> None:
        self.problem, self.is_tuple = problem, problem.is_tuple
        self.batch = problem.shapes[0][0]
        self.shapes = [tuple(s[1:]) for s in problem.shapes]
        self.widths = [math.prod(s) for s in self.shapes]
        self.dtype = problem.dtype

    def pack(self, x: Tensor) -> Tensor:
        """A tensor in the problem's layout (the state, per-entry tolerances) as rows."""
        if not self.is_tuple:
            return x
        parts = self.problem.to_user(x)
        return torch.cat([p.reshape(self.batch, -1) for p in parts], 1)

    def unpack(self, ys: Tensor) -> Tensor:
        """Outputs as rows, ``(T, B, ...)``, back in the problem's layout ``(T, *y0.shape)``."""
        if not self.is_tuple:
            return ys
        return torch.cat([p.reshape(len(ys), -1) for p in ys.split(self.widths, 2)], 1)

    def to_user(self, y: Tensor):
        """Rows ``(m, ...)`` in the user's structure."""
        if not self.is_tuple:
            return y
        m = y.shape[0]
        return tuple(p.reshape(m, *s) for p, s in zip(y.split(self.widths, 1), self.shapes))

    def checked(self, out, m: int):
        """``func``'s result for ``m`` rows, refused unless it has the rows' structure."""
        outs = out if self.is_tuple else (out,)
        if not (
            isinstance(outs, (tuple, list))
            and len(outs) == len(self.shapes)
            and all(
                isinstance(o, Tensor) and o.shape == (m, *s) and o.dtype == self.dtype
                for o, s in zip(outs, self.shapes)
            )
        ):
            raise ValueError(_wrong_result(out, m, self.shapes, self.dtype))
        return out

    def rows_of(self, out, m: int) -> Tensor:
        """``func``'s result for ``m`` rows, checked, as rows."""
        out = self.checked(out, m)
        if not self.is_tuple:
            return out
        return torch.cat([o.reshape(m, -1) for o in out], 1)


def _wrong_result(out, m: int, shapes, dtype) -> str:
    expected = "; ".join(f"shape {(m, *s)}" for s in shapes)
    return (
        f"func(t, y) must return dy/dt with the structure of the rows it is given ({expected}) "
        f"and dtype {dtype}; it returned {describe_result(out)}. With options['steps']='sample' it "
        f"is called with the {m} samples still running and t of shape ({m},), one time each"
    )


class Active:
    """The running samples, one row each: every field is indexed by row and compacted
    together when samples finish. ``pos`` and ``next_out`` (each row's next output time and
    its index) only where there are output times before the final one; the tolerances only
    where they differ between samples."""

    def __init__(self, **fields: Tensor) -> None:
        shared = ("atol", "rtol", "next_out")  # may hold one row for all samples
        self.rows = tuple(
            name
            for name, value in fields.items()
            if name not in shared or (value.ndim > 0 and value.shape[0] > 1)
        )
        for name, value in fields.items():
            setattr(self, name, value)

    @property
    def size(self) -> int:
        return self.t.shape[0]

    def compact(self, keep: Tensor) -> None:
        """Keep only the rows ``keep`` (indices into the current rows)."""
        for name in self.rows:
            setattr(self, name, getattr(self, name).index_select(0, keep))


class Step:
    """One batched step as it was tried: what the controller, the outputs and the errors
    read afterwards."""

    __slots__ = (
        "t_old", "y_old", "hs", "signed", "col", "t_new", "y1", "hks", "last", "y1_abs",
        "reached", "stuck",
    )  # fmt: skip

    def __init__(self, t_old, y_old, hs, signed, col, t_new, y1, hks, last) -> None:
        self.t_old, self.y_old, self.hs, self.signed, self.col = t_old, y_old, hs, signed, col
        self.t_new, self.y1, self.hks, self.last = t_new, y1, hks, last
        self.stuck = None


class PerSampleSolver:
    """The per-sample loop for one problem and its settings (one :meth:`run` per solve)."""

    def __init__(self, problem: Problem, cfg: Config) -> None:
        self.cfg, self.tab, self.func = cfg, cfg.tableau, problem.func
        self.layout = layout = RowLayout(problem)
        self.ts, self.batch = problem.ts, layout.batch
        self.t0, self.t_end = problem.ts[0], problem.ts[-1]
        self.forward = self.t_end > self.t0
        self.device, self.dtype = problem.device, problem.dtype
        self.beta1 = (cfg.pcoeff + cfg.icoeff) / self.tab.order
        self.beta2 = cfg.pcoeff / self.tab.order
        self.span = abs(self.t_end - self.t0)
        self.tiny = 4 * cfg.time_eps * max(abs(self.t0), abs(self.t_end))
        self.clip = cfg.min_step > 0 or cfg.max_step < math.inf
        # the output times after t0, as float64 (the last is the final time)
        self.ts_after = torch.tensor(problem.ts[1:], dtype=torch.float64, device=self.device)
        sections = layout.widths if layout.is_tuple and len(layout.widths) > 1 else None
        self.sections = sections
        self.nfe = self.iterations = 0
        self.above: Tensor | bool = False  # a step of min_step accepted above the tolerance
        self.t_end_t = torch.tensor(self.t_end, dtype=torch.float64, device=self.device)
        # the stages' nodes but 0 and 1 (t_new), as a column for all stage times at once
        self.nodes = tuple(sorted({c for c in self.tab.c if c not in (0.0, 1.0)}))
        self.node_col = torch.tensor(self.nodes, dtype=torch.float64, device=self.device)[:, None]
        ndim = len(problem.shapes[0]) if not layout.is_tuple else 2
        self.col_shape = (-1, *(1,) * (ndim - 1))
        self.row_dims = tuple(range(1, ndim))
        # a rejected step's factor stays below 1 by itself when safety <= 1 and every
        # accepted ratio is <= 1 (no min_step): the memory safety * r^beta2 is then <= 1
        self.cap_rejected = cfg.safety >= 1 or cfg.min_step > 0
        # the controller's memory holds safety, and the landing slack that the step sizes
        # carry (a.h is (1 + slack) times the controller's step: see attempt)
        self.safety = cfg.safety * (1 + LANDING_SLACK) if not self.clip else cfg.safety
        self.inner = len(problem.ts) > 2  # output times before the final one
        self.end_base = (len(problem.ts) - 1) * self.batch  # the final outputs' flat index
        self.call = self.make_call()
        self.plain = not layout.is_tuple and self.dtype == torch.float64
        self.err_terms = [(i, e) for i, e in enumerate(self.tab.b_err) if e != 0.0]

    def make_call(self):
        """``call(t, y)``: ``func`` on the rows ``y`` at their times ``t`` (float64), as rows,
        checked; counted in ``self.nfe``. A single float64 tensor takes the short way."""
        func, layout, dtype = self.func, self.layout, self.dtype

        def call(t: Tensor, y: Tensor) -> Tensor:
            self.nfe += 1
            tt = t if dtype == torch.float64 else t.to(dtype)
            return layout.rows_of(func(tt, layout.to_user(y)), y.shape[0])

        if layout.is_tuple or dtype != torch.float64:
            return call

        def call_plain(t: Tensor, y: Tensor) -> Tensor:
            self.nfe += 1
            out = func(t, y)
            if out.__class__ is not Tensor or out.shape != y.shape or out.dtype != dtype:
                return layout.rows_of(out, y.shape[0])  # refuses what is not y's shape
            return out

        return call_plain

    def run(self, y0: Tensor) -> tuple[Tensor, Counts]:
        """Solve from the problem's ``y0`` (its layout): ``(T, *y0.shape)`` and the counts."""
        y = self.layout.pack(y0)
        self.outputs = [(torch.arange(self.batch, device=self.device), y)]
        # per group of finished samples: accepted steps, next step size, steps tried (all rows
        # try one step per iteration, so a sample's tries are the iterations it ran)
        self.finished: list[tuple[Tensor, Tensor, int]] = []
        if len(self.ts) > 1 and self.batch > 0:
            active = self.start(y)
            while active.size > 0:
                self.iterations += 1
                self.step(active)
        if bool(self.above):
            warnings.warn(
                f"steps of min_step={self.cfg.min_step:g} accepted above the tolerance: the "
                "solution is less accurate than rtol/atol ask; lower options['min_step'] or "
                "loosen rtol/atol",
                stacklevel=6,
            )
        return self.layout.unpack(self.collect(y)), self.counts()

    def start(self, y: Tensor) -> Active:
        """The running rows at ``t0``: ``f(t0, y0)``, tolerances as rows, the first steps."""
        B, cfg, f64 = self.batch, self.cfg, torch.float64
        t = torch.full((B,), self.t0, dtype=f64, device=self.device)
        k0 = self.call(t, y)
        if not bool(torch.isfinite(k0).all()):
            row = int((~torch.isfinite(k0.reshape(B, -1))).any(1).nonzero()[0, 0])
            where = describe_non_finite(k0[row], None)
            raise SolverError(
                f"func(t, y) returned {where} for sample {row} at the initial state "
                f"(t={self.t0:.17g}); check the vector field there",
                t=self.t0,
                step_size=0.0,
            )
        tols = []
        for tol in (cfg.atol, cfg.rtol):
            rows = self.layout.pack(tol.reshape(self.layout.problem.y0.shape))
            rows = rows[:1] if bool((rows == rows[:1]).all()) else rows
            tols.append(rows * self.width_roots(rows))
        active = Active(
            idx=torch.arange(B, device=self.device), t=t, h=t, y=y, k0=k0, atol=tols[0],
            rtol=tols[1], y_abs=y.detach().abs(),
            prev=torch.full((B,), self.safety, dtype=f64, device=t.device),
            n_acc=torch.zeros(B, dtype=torch.long, device=t.device),
            **self.outputs_ahead(B),
        )  # fmt: skip
        if cfg.first_step is not None:
            h = torch.full((B,), min(cfg.first_step, self.span), dtype=f64, device=t.device)
        else:
            h = self.first_step(active)
        h = h.clamp(cfg.min_step, cfg.max_step) if self.clip else h
        active.h = h * (1 + LANDING_SLACK)
        return active

    def width_roots(self, like: Tensor) -> Tensor | float:
        """``sqrt`` of each entry's row width (of its tensor's, for a tuple state): the
        tolerances times it make a row's 2-norm its RMS (:meth:`error_ratio`)."""
        if self.sections is None:
            return math.sqrt(max(math.prod(like.shape[1:]), 1))
        roots = [torch.full((w,), math.sqrt(w), dtype=like.dtype) for w in self.sections]
        return torch.cat(roots).to(like.device)

    def outputs_ahead(self, batch: int) -> dict[str, Tensor]:
        """Every row's next output time (and its index, where there are several): one shared
        0-dim tensor, the final time, where it is the only one."""
        if not self.inner:
            return {"next_out": self.t_end_t}
        return {
            "pos": torch.zeros(batch, dtype=torch.long, device=self.device),
            "next_out": self.ts_after[:1].expand(batch).clone(),
        }

    def first_step(self, a: Active) -> Tensor:
        """Hairer, Norsett & Wanner's first step (as the shared controller's), per row."""
        with torch.no_grad():
            y, f0, span = a.y, a.k0, self.span
            # the tolerances carry sqrt(width): error_ratio's 2-norms are then the rows' RMS
            scale = torch.addcmul(a.atol, a.rtol, y.abs()).double()
            d0, d1 = self.error_ratio(y.double() / scale), self.error_ratio(f0.double() / scale)
            h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
            floor = 64 * self.cfg.time_eps * max(abs(self.t0), span)
            h0 = torch.where(h0 > 0, h0, floor).clamp(max=span)
            signed = h0 if self.forward else -h0
            col = signed.to(y.dtype).view(-1, *(1,) * (y.ndim - 1))
            f1 = self.call(a.t + signed, y + col * f0)
            d2 = self.error_ratio((f1.double() - f0.double()) / scale) / h0
            dmax = torch.maximum(d1, d2)
            h1 = (0.01 / dmax) ** (1.0 / self.tab.order)
            h1 = torch.where(dmax <= 1e-15, (h0 * 1e-3).clamp(min=1e-6), h1)
            h1 = torch.where(torch.isfinite(dmax), h1, h0 * 1e-3)
            return torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h1, span))

    def step(self, a: Active) -> None:
        """One step of every running sample: tried, judged, taken where accepted."""
        s = self.attempt(a)
        acc, h_new, ratio = self.judge(a, s)
        acc_rows = acc.view(self.col_shape)
        a.t = torch.where(acc, s.t_new, a.t)
        a.y = torch.where(acc_rows, s.y1, a.y)
        a.y_abs = torch.where(acc_rows, s.y1_abs, a.y_abs)
        a.k0 = torch.where(acc_rows, s.last, a.k0) if self.tab.fsal else self.call(a.t, a.y)
        # the controller's memory, safety included: safety * r^beta2 of the last accepted step
        memory = ratio.clamp_(min=1e-4).pow_(self.beta2).mul_(self.safety)
        a.prev = torch.where(acc, memory, a.prev)
        a.h = h_new
        a.n_acc.add_(acc)
        # a rejected row keeps its time, short of its next output time: only accepted ones pass
        reached = a.t >= a.next_out if self.forward else a.t <= a.next_out
        flag = reached
        if self.iterations % CHECK_EVERY == 0 or self.iterations > self.cfg.max_num_steps:
            flag = flag | (h_new <= self.tiny) | (a.n_acc > self.cfg.max_num_steps)
            flag = flag if s.stuck is None else flag | s.stuck
        if flag.any().item():
            s.reached = reached
            self.on_event(a, s, flag is not reached)

    def attempt(self, a: Active) -> Step:
        """Every running sample's next step (landing on the final time where it nearly ends)."""
        # a.h carries the landing slack: a step that would end within it of the end lands
        # on the end exactly
        if self.forward:
            t_new = torch.minimum(a.t + a.h, self.t_end_t)
            hs = signed = t_new - a.t
        else:
            t_new = torch.maximum(a.t - a.h, self.t_end_t)
            signed = t_new - a.t
            hs = signed.abs()
        col = signed.view(self.col_shape)
        col = col if self.dtype == torch.float64 else col.to(self.dtype)
        # the stage times t + c_i h, in one operation; the step's end is t_new exactly
        times = dict(zip(self.nodes, torch.addcmul(a.t, self.node_col, signed).unbind()))
        times[1.0] = t_new
        last = []
        if self.plain:  # a single float64 tensor: func called here, its result checked
            func, rows_of, shape = self.func, self.layout.rows_of, a.y.shape

            def stage(c: float, y: Tensor) -> Tensor:
                f = func(times[c], y)
                if f.__class__ is not Tensor or f.shape != shape or f.dtype != torch.float64:
                    f = rows_of(f, shape[0])  # refuses what is not y's shape
                last.append(f)
                return f * col

        else:
            call = self.call

            def stage(c: float, y: Tensor) -> Tensor:
                f = call(times[c], y)
                last.append(f)
                return f * col

        y1, hks = rk_step(stage, self.tab, 0.0, a.y, a.k0 * col, 1.0)
        if self.plain:
            self.nfe += len(last)
        return Step(a.t, a.y, hs, signed, col, t_new, y1, hks, last[-1])

    def judge(self, a: Active, s: Step) -> tuple[Tensor, Tensor, Tensor]:
        """Each row's error ratio, accept/reject and next step size: the shared PI
        controller's rule, row by row (``a.prev`` holds ``safety * r_{n-1}^beta2``)."""
        cfg = self.cfg
        with torch.no_grad():
            (i, e), *rest = self.err_terms
            err = s.hks[i] * e
            for i, e in rest:
                err = torch.add(err, s.hks[i], alpha=e)
            s.y1_abs = s.y1.abs()
            scale = torch.addcmul(a.atol, a.rtol, torch.maximum(a.y_abs, s.y1_abs))
            ratio = self.error_ratio(err.div_(scale)).nan_to_num_(math.inf, math.inf)
            acc = ratio <= 1.0
            if cfg.min_step > 0:  # a step of min_step stands whatever its (finite) error
                at_min, finite = s.hs <= cfg.min_step * (1 + 2 * LANDING_SLACK), ratio < math.inf
                acc |= at_min & finite
                s.stuck = at_min & ~finite  # no smaller step to try: refused when checked
                self.above = (acc & (ratio > 1.0)).any() | self.above  # read once, at the end
            factor = ratio.pow(-self.beta1).mul_(a.prev).clamp_(cfg.dfactor, cfg.ifactor)
            if self.cap_rejected:  # a rejected step only shrinks
                factor = torch.where(acc, factor, factor.clamp(max=1.0))
            h_new = s.hs * factor
            if self.clip:  # the landing slack on top of the bounds, as everywhere
                h_new = h_new.clamp_(cfg.min_step, cfg.max_step).mul_(1 + LANDING_SLACK)
        return acc, h_new, ratio

    def error_ratio(self, x: Tensor) -> Tensor:
        """Each row's RMS of the scaled error ``x`` (the largest over the state's tensors),
        float64; the tolerances carry ``sqrt`` of the row's (section's) width, so that this
        is a plain 2-norm."""
        if self.sections is None:
            norm = torch.linalg.vector_norm(x, dim=self.row_dims) if x.ndim > 1 else x.abs()
        else:
            norm = torch.stack(
                [torch.linalg.vector_norm(p, dim=1) for p in x.split(self.sections, 1)]
            ).amax(0)
        return norm if norm.dtype == torch.float64 else norm.double()

    def on_event(self, a: Active, s: Step, checked: bool) -> None:
        """Samples in trouble (refused, where ``checked``), outputs passed, samples finished
        (their final state kept, their rows compacted away)."""
        fin = s.reached & (s.t_new == self.t_end_t)  # reached rows are accepted ones
        if checked:
            self.check_rows(a, s, fin)
        if self.inner:
            rows = s.reached.nonzero()[:, 0]
            if rows.numel():
                self.emit_inner(a, s, rows)
        done = fin.nonzero()[:, 0]
        if done.numel():
            self.outputs.append((self.end_base + a.idx[done], s.y1[done]))
            self.finished.append((a.n_acc[done], a.h[done], self.iterations))
            a.compact((~fin).nonzero()[:, 0])

    def check_rows(self, a: Active, s: Step, fin: Tensor) -> None:
        """Refuse a sample whose step size underflowed or that took too many steps."""
        if s.stuck is not None and s.stuck.any().item():
            raise self.underflow(a, s, int(s.stuck.nonzero()[0, 0]), self.cfg.min_step)
        trouble = (a.h <= self.tiny) & ~fin
        if trouble.any().item():
            raise self.underflow(a, s, int(trouble.nonzero()[0, 0]))
        if self.iterations > self.cfg.max_num_steps:
            over = a.n_acc > self.cfg.max_num_steps
            if over.any().item():
                raise self.too_many_steps(a, int(over.nonzero()[0, 0]))

    def emit_inner(self, a: Active, s: Step, rows: Tensor) -> None:
        """The output times before the final one that the rows ``rows`` passed in their step,
        read by the dense output inside it; the rows' next output times move on."""
        t_new, after = s.t_new[rows], self.ts_after
        passed = (after <= t_new[:, None]) if self.forward else (after >= t_new[:, None])
        pos_new = passed.sum(1)
        last = len(after) - 1
        cols = torch.arange(last, device=self.device)
        pairs = ((cols >= a.pos[rows, None]) & (cols < pos_new[:, None])).nonzero()
        if pairs.numel():
            ri, ji = rows[pairs[:, 0]], pairs[:, 1]
            theta = (after[ji] - s.t_old[ri]) / s.signed[ri]
            hks = [k[ri] for k in s.hks]
            if not self.tab.fsal:  # the interpolant's extra row: h f(t + h, y1)
                hks.append((a.k0 * s.col)[ri])
            values = dense_output_rows(self.tab, s.y_old[ri], hks, theta)
            self.outputs.append(((ji + 1) * self.batch + a.idx[ri], values))
        a.pos[rows] = pos_new
        a.next_out = after[a.pos.clamp(max=last)]

    def collect(self, y0: Tensor) -> Tensor:
        """Every output row in its place: ``(T, B, ...)``."""
        index = torch.cat([i for i, _ in self.outputs])
        values = torch.cat([v for _, v in self.outputs])
        ys = values[torch.argsort(index)].view(len(self.ts), *y0.shape)
        if not bool(torch.isfinite(ys[-1]).all()):
            bad = (~torch.isfinite(ys[-1].reshape(self.batch, -1))).any(1).nonzero()[0, 0]
            raise SolverError(
                f"the solution of sample {int(bad)} is not finite at t={self.t_end:g} "
                f"({describe_non_finite(ys[-1, int(bad)], None)}); check the vector field "
                "for a finite-time blow-up or NaN",
                t=self.t_end,
                step_size=math.nan,
            )
        return ys

    def counts(self) -> Counts:
        """NFE (batched calls of ``func``), and each sample's steps: the most any took."""
        counts = Counts(nfe=self.nfe)
        if self.finished:
            acc = torch.cat([n for n, _, _ in self.finished])
            h = torch.cat([h for _, h, _ in self.finished])
            rej = torch.cat([steps - n for n, _, steps in self.finished])
            counts.n_accepted, counts.n_rejected = int(acc.max()), int(rej.max())
            counts.step_size = float(h.max())
        return counts

    def underflow(self, a: Active, s: Step, row: int, min_step: float = 0.0) -> SolverError:
        """The error for a sample whose step size underflowed (or whose step of ``min_step``
        is not finite): what its stages held."""
        sample, t, h = int(a.idx[row]), float(a.t[row]), float(s.signed[row])
        tried = (
            f"a step of min_step={min_step:g}"
            if min_step
            else f"every step from t={t:.17g} down to h={abs(h):.3g}"
        )
        for k, c in zip(s.hks, self.tab.c):
            if not bool(torch.isfinite(k[row]).all()):
                where = describe_non_finite(k[row], None)
                return SolverError(
                    f"func(t, y) returned {where} for sample {sample} near "
                    f"t={t + c * h:.17g} ({tried}); "
                    "check the vector field at that time and state",
                    t=t,
                    step_size=h,
                )
        if min_step:
            return SolverError(
                f"the solution of sample {sample} overflows near t={t:.17g} ({tried}); it "
                "may blow up near this time: check the vector field or lower min_step",
                t=t,
                step_size=h,
            )
        return SolverError(
            f"step size underflow for sample {sample} at t={t:.17g} (h={h:.3g}): its solution "
            "may blow up near this time or it is too stiff for an explicit method; check the "
            "vector field, shorten the time span or loosen rtol/atol",
            t=t,
            step_size=h,
        )

    def too_many_steps(self, a: Active, row: int) -> SolverError:
        sample, t = int(a.idx[row]), float(a.t[row])
        return SolverError(
            f"sample {sample} took more than max_num_steps={self.cfg.max_num_steps} steps "
            f"before reaching t={self.t_end:g} (at t={t:.17g}); raise options['max_num_steps'], "
            "loosen rtol/atol, or check the vector field for stiffness",
            t=t,
            step_size=float(a.h[row]),
        )
