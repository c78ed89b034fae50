"""Benchmark the divergence computations of :mod:`cnf.trace` against FFJORD's loop.

Field: ConcatSquash MLP D-64-64-64-D (tanh), batch 256, float32, one thread. Methods:

* ``loop``: FFJORD's exact trace, one ``autograd.grad`` per dimension;
* ``generic``: :func:`cnf.trace.divergence_exact` with ``field_aware=False`` (one vjp, vmapped
  over chunks of the basis vectors);
* ``field-aware``: :func:`cnf.trace.divergence_exact` (the MLP's analytic trace);
* ``hutchinson``: :func:`cnf.trace.divergence_hutchinson` with one Rademacher probe.

Modes: ``eval`` (no graph kept), ``graph`` (differentiable trace, i.e. ``create_graph``),
``graph+bwd`` (plus ``(f.sum() + div.sum()).backward()`` to the parameters and z).
Prints the median wall time and CPU time of each and the speed-up over the loop as markdown
tables. Gradients accumulate across repeats (``.backward()`` without zeroing), which costs the
same every time.

Run: ``python scripts/bench_trace.py [--dims 2 8 32 128] [--batch 256] [--min-time 3]``.

``--conv`` adds a convolutional field on 8x8 single-channel images (the digits, single scale,
D = 64): :class:`cnf.fields.ConcatSquashConvNet` 1-16-16-16-1 (3x3, softplus), batch 128
(``--conv-batch``, ``--conv-hidden``); a convolution has no analytic trace, so ``field-aware``
is left out of its table.

``--train ITERS`` adds a short 2-D training run (pinwheel, FFJORD's 64-64-64 tanh model, T = 0.5,
dopri5 at 1e-5, batch 256, Adam 1e-3) per variant: exact or Hutchinson trace, with and without
the RNODE regularizers (kinetic energy and Jacobian Frobenius norm, weights 0.01), and with the
log-density channel at a 10x looser tolerance; it reports mean forward/backward NFE, seconds per
iteration, the last 50 iterations' training NLL and the held-out NLL (exact trace, 1e-6).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import time

import torch

from cnf.fields import ConcatSquashMLP
from cnf.trace import divergence_exact, divergence_hutchinson, sample_noise

MODES = ("eval", "graph", "graph+bwd")
METHODS = ("loop", "generic", "field-aware", "hutchinson")


def ffjord_loop(field, t, z, create_graph):
    """FFJORD's ``divergence_bf``: one backward pass per entry of the (flattened) event."""
    with torch.enable_grad():
        z = z if z.requires_grad else z.detach().requires_grad_(True)
        f = field(t, z)
        flat = f.reshape(f.shape[0], -1)
        div = torch.zeros(z.shape[0], dtype=z.dtype)
        for i in range(flat.shape[1]):
            (row,) = torch.autograd.grad(
                flat[:, i].sum(), z, create_graph=create_graph, retain_graph=True
            )
            div = div + row.reshape(row.shape[0], -1)[:, i]
    return f, div


def make_call(method, field, t, z, noise, mode):
    def compute():
        if method == "loop":
            return ffjord_loop(field, t, z, create_graph=mode != "eval")
        if method == "generic":
            return divergence_exact(field, t, z, field_aware=False)
        if method == "field-aware":
            return divergence_exact(field, t, z)
        return divergence_hutchinson(field, t, z, noise)

    def call():
        if mode == "eval":
            if method == "loop":  # the loop needs autograd; it keeps no graph after it returns
                f, div = compute()
                return f.detach(), div.detach()
            with torch.no_grad():
                return compute()
        f, div = compute()
        if mode == "graph+bwd":
            (f.sum() + div.sum()).backward()
        return f, div

    return call


def tune_malloc():
    """Make glibc keep freed memory instead of handing it back to the OS.

    By default glibc serves large blocks with mmap and trims its heap, so every call that
    allocates MB-sized temporaries (the batched methods do; the loop's tensors are small)
    page-faults them in again: about 3 us per 4 KB page on the VM this was written on. This is
    what jemalloc/tcmalloc or ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` do too.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    if not (libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)):
        raise RuntimeError("mallopt failed; --tune-malloc needs glibc")


def measure(calls, min_time, min_rounds):
    """Median wall and CPU (thread) time of every call, in ms.

    The calls run round-robin, so that load from other processes spreads over all of them
    alike; CPU time of this thread is reported beside wall time because it is much less
    sensitive to such load.
    """
    for call in calls.values():
        call()  # warm-up
    wall = {key: [] for key in calls}
    cpu = {key: [] for key in calls}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - start < min_time:
        for key, call in calls.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            call()
            cpu[key].append(time.thread_time() - c0)
            wall[key].append(time.perf_counter() - w0)
        rounds += 1
    med = statistics.median
    return {k: 1e3 * med(v) for k, v in wall.items()}, {k: 1e3 * med(v) for k, v in cpu.items()}


def table(rows, which, methods=METHODS):
    lines = ["| D | mode | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for dim, times in rows:
        times = times[which]
        for mode in MODES:
            loop = times["loop", mode]
            cells = [
                f"{times[m, mode]:.2f}"
                + ("" if m == "loop" else f" ({loop / times[m, mode]:.1f}x)")
                for m in methods
            ]
            lines.append(f"| {dim} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conv_section(args) -> str:
    """The generic trace against the loop for a conv field on 8x8 single-channel images."""
    from cnf.fields import ConcatSquashConvNet

    torch.manual_seed(0)
    hidden = tuple(args.conv_hidden)
    field = ConcatSquashConvNet(1, hidden_channels=hidden, activation="softplus")
    z = torch.randn(args.conv_batch, 1, 8, 8).requires_grad_(True)
    noise = sample_noise(z.shape, "rademacher", generator=torch.Generator().manual_seed(0))
    methods = ("loop", "generic", "hutchinson")
    calls = {
        (method, mode): make_call(method, field, torch.tensor(0.5), z, noise, mode)
        for mode in MODES
        for method in methods
    }
    wall, cpu = measure(calls, args.min_time, args.min_rounds)
    rows = [(64, (wall, cpu))]
    return (
        f"ConcatSquashConvNet 1-{'-'.join(map(str, hidden))}-1 (3x3, softplus) on (1, 8, 8), "
        f"D = 64, batch {args.conv_batch}, float32. Median ms (speed-up over the loop).\n\n"
        f"Wall time:\n\n{table(rows, 0, methods)}\n\n"
        f"CPU time of the benchmark thread:\n\n{table(rows, 1, methods)}"
    )


def train_section(iters: int) -> str:
    """Forward/backward NFE and loss of short training runs with and without regularizers."""
    from cnf.data import sample_tensor, toy_sampler
    from cnf.flow import CNF
    from cnf.training import evaluate_nll, fit

    variants = [
        ("exact", {}, {}),
        ("exact + RNODE (0.01, 0.01)", {}, {"kinetic": 0.01, "jacobian": 0.01}),
        ("exact, log-density tol x10", {"logp_rtol": 1e-4, "logp_atol": 1e-4}, {}),
        ("hutchinson", {"trace": "hutchinson"}, {}),
        (
            "hutchinson + RNODE (0.01, 0.01)",
            {"trace": "hutchinson"},
            {"kinetic": 0.01, "jacobian": 0.01},
        ),
    ]
    test = sample_tensor("pinwheel", 5000, seed=1, dtype=torch.float32)
    lines = [
        f"pinwheel, {iters} iterations, batch 256; NFE are means over the run.",
        "",
        "| variant | forward NFE | backward NFE | s / iteration | train NLL (last 50) | "
        "held-out NLL |",
        "|---|---|---|---|---|---|",
    ]
    for label, model_kw, fit_kw in variants:
        torch.manual_seed(0)
        field = ConcatSquashMLP(2, hidden=(64, 64, 64), activation="tanh")
        model = CNF(field, (2,), T=0.5, rtol=1e-5, atol=1e-5, **model_kw)
        h = fit(
            model,
            toy_sampler("pinwheel"),
            iters=iters,
            batch_size=256,
            lr=1e-3,
            progress=False,
            seed=0,
            **fit_kw,
        )
        nll = evaluate_nll(model, test, rtol=1e-6, atol=1e-6)
        n = len(h.iteration)
        lines.append(
            f"| {label} | {sum(h.nfe_forward) / n:.1f} | {sum(h.nfe_backward) / n:.1f} | "
            f"{sum(h.seconds) / n:.3f} | {sum(h.nll[-50:]) / len(h.nll[-50:]):.3f} | {nll:.3f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 128])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64])
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds per dimension")
    parser.add_argument("--min-rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--tune-malloc", action="store_true", help="keep freed memory in glibc (see tune_malloc)"
    )
    parser.add_argument(
        "--train",
        type=int,
        default=0,
        metavar="ITERS",
        help="also run the short training comparison for ITERS iterations",
    )
    parser.add_argument("--skip-traces", action="store_true", help="only the training section")
    parser.add_argument("--conv", action="store_true", help="also the conv field on 8x8 images")
    parser.add_argument("--conv-batch", type=int, default=128)
    parser.add_argument("--conv-hidden", type=int, nargs="+", default=[16, 16, 16])
    args = parser.parse_args()
    if args.tune_malloc:
        tune_malloc()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for dim in [] if args.skip_traces else args.dims:
        field = ConcatSquashMLP(dim, hidden=tuple(args.hidden), activation="tanh")
        z = torch.randn(args.batch, dim).requires_grad_(True)
        t = torch.tensor(0.5)
        noise = sample_noise(z.shape, "rademacher", generator=torch.Generator().manual_seed(0))
        calls = {
            (method, mode): make_call(method, field, t, z, noise, mode)
            for mode in MODES
            for method in METHODS
        }
        wall, cpu = measure(calls, args.min_time, args.min_rounds)
        rows.append((dim, (wall, cpu)))

    print(
        f"ConcatSquash MLP D-{'-'.join(map(str, args.hidden))}-D (tanh), batch {args.batch}, "
        f"float32, {args.threads} thread(s), torch {torch.__version__}, "
        f"{'tuned' if args.tune_malloc else 'default'} glibc malloc.\n"
        "eval: no graph; graph: differentiable trace (create_graph); graph+bwd: plus "
        "(f.sum() + div.sum()).backward(). Median ms (speed-up over the loop).\n"
    )
    if rows:
        print("Wall time:\n")
        print(table(rows, 0))
        print("\nCPU time of the benchmark thread (less sensitive to other load):\n")
        print(table(rows, 1))
    if args.conv:
        print("\nConvolutional field, digits-sized images:\n")
        print(conv_section(args))
    if args.train:
        print("\nTraining with and without the regularizers:\n")
        print(train_section(args.train))


if __name__ == "__main__":
    main()
