"""Bits/dim on scikit-learn's 8x8 digits: cnf against zuko's NSF and MAF, same data, same split.

    pip install -e '.[bench,images]'
    python scripts/bench_digits.py [--minutes 5] [--models cnf nsf maf]

Data: ``cnf.data.load_digits`` (train 1300 / val 200 / test 297, 17 grey levels), uniformly
dequantized to [0, 17) and scaled to [0, 1), then (for every model) the logit transform with
alpha = 0.05. Bits/dim are in the discrete data's scale,

    bits/dim = (-log p(x) + D log 17) / (D log 2),    x = (x_int + u) / 17,   D = 64,

averaged over 4 dequantization draws (the same draws for every model). Each model trains for
the same wall time on one thread; every ``--eval-seconds`` its validation and test bits/dim are
recorded, and the test value at the best validation point is reported (the models overfit this
small set). References: the uniform model (log2 17 = 4.09) and an independent per-pixel
histogram fitted on train (add-one smoothing).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from cnf.data import load_digits
from cnf.transforms import LogitTransform, bits_per_dim, dequantize

try:
    import zuko
except ImportError:  # pragma: no cover - optional peer
    zuko = None

LEVELS, D, ALPHA = 17, 64, 0.05


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


class ZukoModel:
    """A zuko flow on logit-space data; log p(x) adds the logit transform's log-determinant."""

    def __init__(self, flow):
        self.flow = flow
        self.logit = LogitTransform((1, 8, 8), ALPHA)

    def parameters(self):
        return self.flow.parameters()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, logdet = self.logit.transform(x)
        return self.flow().log_prob(z.reshape(len(z), D)) + logdet


class CNFModel:
    def __init__(self, model, train_kw, eval_kw):
        self.model, self.train_kw, self.eval_kw = model, train_kw, eval_kw

    def parameters(self):
        return self.model.parameters()

    def log_prob(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        return self.model.log_prob(x, **(self.train_kw if train else self.eval_kw))


def evaluate(model, sets: list[torch.Tensor]) -> float:
    with torch.no_grad():
        values = [bits_per_dim(model.log_prob(x), (1, 8, 8), LEVELS).mean().item() for x in sets]
    return sum(values) / len(values)


def train(name, model, train_images, val_sets, test_sets, minutes, eval_seconds, lr, batch):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    next_eval, curve, it = eval_seconds, [], 0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= next_eval or elapsed >= minutes * 60:
            pause = time.perf_counter()
            curve.append((elapsed, evaluate(model, val_sets), evaluate(model, test_sets), it))
            start += time.perf_counter() - pause  # evaluation time does not count as training
            print(
                f"  {name}: {curve[-1][0]:6.0f} s  it {it:5d}  val {curve[-1][1]:.3f}  "
                f"test {curve[-1][2]:.3f}",
                flush=True,
            )
            next_eval += eval_seconds
            if elapsed >= minutes * 60:
                return curve
        idx = torch.randint(len(train_images), (batch,), generator=g)
        x = dequantize(train_images[idx], LEVELS, generator=g).float()
        if isinstance(model, CNFModel):
            logp = model.log_prob(x, train=True)
        else:
            logp = model.log_prob(x)
        loss = -logp.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        it += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--eval-seconds", type=float, default=30.0)
    parser.add_argument("--models", nargs="+", default=["cnf", "nsf", "maf"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    train_images = load_digits("train").images
    val_sets = draws(load_digits("val").images, 4, seed=1)
    test_images = load_digits("test").images
    test_sets = draws(test_images, 4, seed=2)
    print(f"uniform: {math.log2(LEVELS):.3f} bits/dim")
    print(f"per-pixel histogram: {histogram_bpd(train_images, test_images):.3f} bits/dim")

    results = {}
    for name in args.models:
        torch.manual_seed(0)
        if name == "cnf":
            from cnf.multiscale import digits_model

            model = CNFModel(digits_model(), {}, {"trace": "exact"})
            lr, batch = 1e-3, 64
        elif zuko is None:
            print(f"{name}: zuko is not installed, skipped")
            continue
        elif name == "nsf":
            model = ZukoModel(zuko.flows.NSF(D, transforms=5, hidden_features=(256, 256)))
            lr, batch = 1e-3, 64
        elif name == "maf":
            model = ZukoModel(zuko.flows.MAF(D, transforms=5, hidden_features=(256, 256)))
            lr, batch = 1e-3, 64
        else:
            raise SystemExit(f"unknown model {name!r}")
        curve = train(
            name,
            model,
            train_images,
            val_sets,
            test_sets,
            args.minutes,
            args.eval_seconds,
            lr,
            batch,
        )
        best = min(curve, key=lambda c: c[1])
        results[name] = (best, curve)

    print("\n| model | best val bits/dim | test bits/dim there | at (s) | final test |")
    print("|---|---|---|---|---|")
    for name, (best, curve) in results.items():
        print(f"| {name} | {best[1]:.3f} | {best[2]:.3f} | {best[0]:.0f} | {curve[-1][2]:.3f} |")


if __name__ == "__main__":
    main()
