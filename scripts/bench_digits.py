"""Bits/dim on scikit-learn's 8x8 digits: cnf against zuko's flows, same data, same split.

    pip install -e '.[bench,images]'
    python scripts/bench_digits.py [--minutes 15] [--models cnf nsf maf zcnf] \\
        [--out docs/bench_digits.md]

Data: ``cnf.data.load_digits`` (train 1300 / val 200 / test 297, 17 grey levels), uniformly
dequantized to [0, 17) and scaled to [0, 1), then logit-transformed (zuko flows: alpha = 0.05
unless set; cnf: its model's alpha). Bits/dim are in the discrete data's scale,

    bits/dim = (-log p(x) + D log 17) / (D log 2),    x = (x_int + u) / 17,   D = 64,

averaged over 4 dequantization draws (the same draws for every model). Every model trains on
one thread (``--threads``); at regular times its validation and test bits/dim are recorded
(evaluation time is not counted as training time). The models overfit this small set, so each
is reported by the test bits/dim at its best validation point so far, at equal wall times.

* ``cnf``: what ``cnf train --data digits`` does with its defaults (the recipe
  ``cnf.recipes.get("digits")``: the dense MLP model, its iterations, batch, learning rate,
  cosine schedule, RNODE weights, EMA, one-pixel translations), evaluated
  with the exact trace at rtol = atol = 1e-5; it runs for its iteration budget, not
  ``--minutes``.
* ``nsf``, ``maf``: zuko's NSF and MAF (5 transforms, 256-256), Adam 1e-3, batch 64, for
  ``--minutes`` (the issue's reference setting).
* ``zcnf``: zuko's CNF (MLP 256-256-256, Hutchinson trace for training and evaluation), Adam
  1e-3, batch 64, for ``--minutes``.
* a suffix ``@alpha`` (e.g. ``nsf@0.01``) gives a zuko flow another logit ``alpha``, and a
  suffix ``/tP`` (e.g. ``nsf@0.01/t0.5``) trains it on images moved by one pixel with
  probability ``P`` (``cnf.training.image_sampler``'s ``translate``, cnf's digits augmentation).

References: the uniform model (log2 17 = 4.09) and an independent per-pixel histogram fitted on
train (add-one smoothing).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from cnf import recipes
from cnf.data import load_digits
from cnf.models import build
from cnf.training import fit, image_sampler
from cnf.transforms import LogitTransform, bits_per_dim, dequantize

try:
    import zuko
except ImportError:  # pragma: no cover - optional peer
    zuko = None

LEVELS, D, ALPHA = 17, 64, 0.05  # the reference setting for the zuko flows
MARKS = (60, 120, 300, 600, 900)  # seconds of training at which the models are compared


def draws(images: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [dequantize(images, LEVELS, generator=g).float() for _ in range(n)]


def histogram_bpd(train: torch.Tensor, test: torch.Tensor) -> float:
    counts = torch.ones(D, LEVELS)  # add-one smoothing
    flat = train.reshape(len(train), D).long()
    counts.scatter_add_(1, flat.T, torch.ones_like(flat.T, dtype=counts.dtype))
    logp = (counts / counts.sum(1, keepdim=True)).log()
    t = test.reshape(len(test), D).long()
    ll = logp.gather(1, t.T).sum(0)  # (n,)
    return (-ll.mean() / (D * math.log(2))).item()


def mean_bpd(log_prob, sets: list[torch.Tensor]) -> float:
    with torch.no_grad():
        values = [bits_per_dim(log_prob(x), (1, 8, 8), LEVELS).mean().item() for x in sets]
    return sum(values) / len(values)


class Clock:
    """Training seconds (evaluations excluded) and the curve of (seconds, iteration, val, test)."""

    def __init__(self, name: str):
        self.name, self.start, self.paused, self.curve = name, time.perf_counter(), 0.0, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def record(self, iteration: int, evaluate) -> float:
        seconds, tic = self.elapsed(), time.perf_counter()
        val, test = evaluate()
        self.paused += time.perf_counter() - tic
        self.curve.append((seconds, iteration, val, test))
        print(f"  {self.name}: {seconds:6.0f} s  it {iteration:5d}  val {val:.3f}  test {test:.3f}")
        return val


def run_cnf(train_images, val_sets, test_sets, eval_every: int, iters: int | None) -> Clock:
    recipe = recipes.get("digits")
    options = recipe.fit_options(iters=iters, eval_every=eval_every, progress=False)
    model = build(recipe.spec())
    clock, count = Clock("cnf"), [0]

    def evaluate(m):
        count[0] = min(count[0] + eval_every, options["iters"])  # fit also evaluates at the end

        def lp(x):
            return m.log_prob(x, trace="exact", rtol=1e-5, atol=1e-5)

        return clock.record(count[0], lambda: (mean_bpd(lp, val_sets), mean_bpd(lp, test_sets)))

    sampler = image_sampler(train_images, LEVELS, **recipe.augment)
    fit(model, sampler, eval_fn=evaluate, **options)
    return clock


def run_zuko(
    name, flow, alpha, translate, train_images, val_sets, test_sets, minutes, eval_seconds
) -> Clock:
    logit = LogitTransform((1, 8, 8), alpha)
    sampler = image_sampler(train_images, LEVELS, translate=translate)

    def log_prob(x):
        z, logdet = logit.transform(x)
        return flow().log_prob(z.reshape(len(z), D)) + logdet

    def evaluate():
        return mean_bpd(log_prob, val_sets), mean_bpd(log_prob, test_sets)

    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    clock, it, next_eval = Clock(name), 0, eval_seconds
    while True:
        if clock.elapsed() >= min(next_eval, minutes * 60):
            clock.record(it, evaluate)
            next_eval += eval_seconds
            if clock.curve[-1][0] >= minutes * 60:
                return clock
        loss = -log_prob(sampler(64, g).float()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        it += 1


def best_until(curve, seconds: float):
    """``(val, test)`` at the best validation point recorded up to ``seconds``, or None."""
    seen = [c for c in curve if c[0] <= seconds]
    return min(seen, key=lambda c: c[2])[2:] if seen else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="zuko models' budget")
    parser.add_argument("--eval-seconds", type=float, default=30.0, help="zuko models")
    parser.add_argument("--eval-every", type=int, default=250, help="cnf, in iterations")
    parser.add_argument("--cnf-iters", type=int, help="cnf's iterations (default: the CLI's)")
    parser.add_argument("--models", nargs="+", default=["cnf", "nsf", "maf", "zcnf"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_images = load_digits("train").images
    val_sets = draws(load_digits("val").images, 4, seed=1)
    test_images = load_digits("test").images
    test_sets = draws(test_images, 4, seed=2)
    lines = [
        f"uniform: {math.log2(LEVELS):.3f} bits/dim; per-pixel histogram: "
        f"{histogram_bpd(train_images, test_images):.3f} bits/dim",
        "",
    ]
    print(lines[0])

    clocks = []
    for name in args.models:
        torch.manual_seed(0)
        if name == "cnf":
            clocks.append(
                run_cnf(train_images, val_sets, test_sets, args.eval_every, args.cnf_iters)
            )
            continue
        if zuko is None:
            print(f"{name}: zuko is not installed, skipped")
            continue
        rest, _, translate = name.partition("/t")  # e.g. nsf/t0.5: translations
        kind, _, alpha = rest.partition("@")  # e.g. nsf@0.01: the logit's alpha
        alpha = float(alpha) if alpha else ALPHA
        translate = float(translate) if translate else 0.0
        if kind == "nsf":
            flow = zuko.flows.NSF(D, transforms=5, hidden_features=(256, 256))
        elif kind == "maf":
            flow = zuko.flows.MAF(D, transforms=5, hidden_features=(256, 256))
        elif kind == "zcnf":
            flow = zuko.flows.CNF(D, hidden_features=(256, 256, 256), exact=False)
        else:
            raise SystemExit(f"unknown model {name!r}; valid: cnf nsf maf zcnf (zuko: @alpha, /tP)")
        clocks.append(
            run_zuko(
                name,
                flow,
                alpha,
                translate,
                train_images,
                val_sets,
                test_sets,
                args.minutes,
                args.eval_seconds,
            )
        )

    marks = [m for m in MARKS if m <= max(c.curve[-1][0] for c in clocks) + 1]
    lines += [
        "Test bits/dim at the best validation point so far, by training time "
        f"({args.threads} thread(s), torch {torch.__version__}); last columns: the best "
        "validation point over the whole run, its test bits/dim and when it was reached:",
        "",
        "| model | "
        + "".join(f"{m // 60} min | " for m in marks)
        + "best val | its test | at (s) | trained (s) | iterations |",
        "|---|" + "---|" * (len(marks) + 5),
    ]
    for c in clocks:
        cells = "".join(
            "| " if x is None else f"{x[1]:.3f} | "
            for x in (best_until(c.curve, m + 1) for m in marks)
        )
        best = min(c.curve, key=lambda p: p[2])
        lines.append(
            f"| {c.name} | {cells}{best[2]:.3f} | {best[3]:.3f} | {best[0]:.0f} | "
            f"{c.curve[-1][0]:.0f} | {c.curve[-1][1]} |"
        )
    print("\n".join(lines[1:]))
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Digits: cnf against zuko (`scripts/bench_digits.py`)\n\n")
            f.write("\n".join(lines) + "\n\nCurves (seconds, iteration, val, test):\n\n")
            for c in clocks:
                points = ", ".join(f"({s:.0f}, {i}, {v:.3f}, {t:.3f})" for s, i, v, t in c.curve)
                f.write(f"- {c.name}: {points}\n")


if __name__ == "__main__":
    main()
