"""The ``cnf`` command line: ``cnf train | eval | sample | plot``.

argparse lives here and nowhere else: each command turns its flags into plain arguments of the
library's functions (:func:`cnf.train.fit`, :func:`cnf.models.build`, :mod:`cnf.plot`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["main"]


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load(checkpoint: str, device: torch.device, use_ema: bool = True):
    from .models import build
    from .train import CheckpointError, History, load_checkpoint

    state = load_checkpoint(checkpoint, map_location=device)
    if "spec" not in state or "data" not in state:
        raise CheckpointError(f"{checkpoint} has no model spec; was it written by `cnf train`?")
    model = build(state["spec"]).to(device)
    weights = state["model"]
    if use_ema and "ema" in state:
        # AveragedModel's state: "module.<name>" entries plus its step counter.
        prefix = "module."
        weights = {k[len(prefix) :]: v for k, v in state["ema"].items() if k.startswith(prefix)}
    model.load_state_dict(weights)
    model.eval()
    return model, state["data"], History.from_dict(state["history"]), state


def _entropy(name: str) -> float | None:
    from .data import DENSITY_NAMES, density

    return density(name).entropy if name in DENSITY_NAMES else None


def cmd_train(args: argparse.Namespace) -> int:
    from .data import sample_tensor, toy_sampler
    from .models import build, toy_spec
    from .train import fit

    torch.set_num_threads(args.threads) if args.threads else None
    device = _device(args.device)
    out = Path(args.out or f"runs/{args.data}")
    spec = toy_spec(
        hidden=args.hidden,
        activation=args.activation,
        blocks=args.blocks,
        T=args.T,
        train_T=not args.fixed_T,
        trace=args.trace,
        rtol=args.tol,
        atol=args.tol,
        dtype=args.dtype,
    )
    torch.manual_seed(args.seed)
    model = build(spec).to(device)
    dtype = getattr(torch, spec["dtype"])
    eval_data = sample_tensor(args.data, args.eval_n, seed=args.seed + 1, dtype=dtype)
    print(
        f"training a CNF on {args.data}: {args.iters} iterations, batch {args.batch_size}, "
        f"trace {args.trace}, tol {args.tol:g}, device {device}; writing {out}/",
        flush=True,
    )
    tic = time.perf_counter()
    history = fit(
        model,
        toy_sampler(args.data),
        iters=args.iters,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        clip_grad=args.clip_grad,
        kinetic=args.kinetic,
        jacobian=args.jacobian,
        eval_data=eval_data,
        eval_every=args.eval_every,
        eval_solver={"rtol": args.tol, "atol": args.tol},
        ema=args.ema,
        checkpoint_dir=out,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        seed=args.seed,
        device=device,
        progress=not args.quiet,
        extra_state={"spec": spec, "data": args.data},
    )
    seconds = time.perf_counter() - tic
    (out / "history.json").write_text(json.dumps(history.to_dict()))
    line = f"done in {seconds:.0f} s; held-out NLL {history.eval_nll[-1]:.3f} nats"
    entropy = _entropy(args.data)
    if entropy is not None:
        line += f" (entropy {entropy:.3f}, gap {history.eval_nll[-1] - entropy:.3f})"
    print(line, flush=True)
    if not args.no_plot:
        _write_pictures(out / "last.pt", out, device, n=args.plot_n, gif=not args.no_gif)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import sample_tensor
    from .train import evaluate_nll

    device = _device(args.device)
    model, name, _, state = _load(args.checkpoint, device)
    ref = next(model.parameters())
    data = sample_tensor(name, args.n, seed=args.seed, dtype=ref.dtype, device=device)
    tic = time.perf_counter()
    nll = evaluate_nll(model, data, batch_size=args.batch_size, rtol=args.tol, atol=args.tol)
    result = {
        "data": name,
        "n": args.n,
        "nll": nll,
        "iteration": int(state["iteration"]),
        "tol": args.tol,
        "seconds": time.perf_counter() - tic,
    }
    entropy = _entropy(name)
    msg = (
        f"{name}: test NLL {nll:.4f} nats on {args.n} fresh samples (exact trace, tol {args.tol:g})"
    )
    if entropy is not None:
        result.update(entropy=entropy, gap=nll - entropy)
        msg += f"; entropy {entropy:.4f}, gap {nll - entropy:.4f}"
    print(msg)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    device = _device(args.device)
    model, _, _, _ = _load(args.checkpoint, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        x = model.sample(args.n, generator=gen)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, x.detach().cpu().numpy())
    print(f"wrote {args.n} samples to {out}")
    return 0


def _write_pictures(checkpoint, out: Path, device, *, n: int, gif: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from . import plot
    from .data import DENSITY_NAMES, density, sample

    model, name, history, _ = _load(str(checkpoint), device)
    data = sample(name, n, seed=0)
    true = density(name) if name in DENSITY_NAMES else None
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "density.png": plot.plot_density(model, data=data, true_density=true),
        "samples.png": plot.plot_samples(
            model.sample(n, generator=torch.Generator(device=device).manual_seed(0)).detach(),
            data=data,
        ),
        "trajectories.png": plot.plot_trajectories(model),
        "curves.png": plot.plot_curves(history.to_dict()),
    }
    for fname, fig in figures.items():
        fig.savefig(out / fname, dpi=120, bbox_inches="tight")
        plt.close(fig)
    written = list(figures)
    if gif:
        plot.animate_flow(model, out / "flow.gif")
        written.append("flow.gif")
    print(f"wrote {', '.join(written)} to {out}/", flush=True)


def cmd_plot(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    _write_pictures(args.checkpoint, out, _device(args.device), n=args.n, gif=not args.no_gif)
    return 0


def _parser() -> argparse.ArgumentParser:
    from .data import NAMES
    from .models import TOY_DEFAULTS

    p = argparse.ArgumentParser(
        prog="cnf", description="Continuous normalizing flows: train, evaluate, sample, plot."
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fit a 2-D density by maximum likelihood")
    t.add_argument("--data", default="8gaussians", choices=NAMES)
    t.add_argument("--out", help="output folder (default runs/<data>)")
    t.add_argument("--iters", type=int, default=DEFAULTS["iters"])
    t.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    t.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--schedule", choices=("constant", "cosine"), default=DEFAULTS["schedule"])
    t.add_argument("--clip-grad", type=float, default=None)
    t.add_argument("--trace", choices=("exact", "hutchinson"), default=TOY_DEFAULTS["trace"])
    t.add_argument("--tol", type=float, default=TOY_DEFAULTS["rtol"], help="rtol = atol")
    t.add_argument("--hidden", type=_ints, default=TOY_DEFAULTS["hidden"])
    t.add_argument("--activation", default=TOY_DEFAULTS["activation"])
    t.add_argument("--blocks", type=int, default=TOY_DEFAULTS["blocks"])
    t.add_argument("--T", type=float, default=TOY_DEFAULTS["T"])
    t.add_argument("--fixed-T", action="store_true", help="do not learn the integration time")
    t.add_argument("--kinetic", type=float, default=DEFAULTS["kinetic"])
    t.add_argument("--jacobian", type=float, default=DEFAULTS["jacobian"])
    t.add_argument("--ema", type=float, default=DEFAULTS["ema"])
    t.add_argument("--dtype", choices=("float32", "float64"), default=TOY_DEFAULTS["dtype"])
    t.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"])
    t.add_argument("--eval-n", type=int, default=5000, help="held-out samples for the curves")
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    t.add_argument("--plot-n", type=int, default=20000, help="samples in the pictures")
    t.add_argument("--no-plot", action="store_true")
    t.add_argument("--no-gif", action="store_true")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="exact test NLL on fresh samples")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--n", type=int, default=20000)
    e.add_argument("--tol", type=float, default=1e-7)
    e.add_argument("--batch-size", type=int, default=5000)
    e.add_argument("--seed", type=int, default=12345)
    e.add_argument("--json", help="also write the result to this JSON file")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="draw samples to a .npy file")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--n", type=int, default=10000)
    s.add_argument("--out", default="samples.npy")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_sample)

    q = sub.add_parser("plot", help="write the pictures of a trained model")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--out", help="folder (default: the checkpoint's)")
    q.add_argument("--n", type=int, default=20000)
    q.add_argument("--no-gif", action="store_true")
    q.add_argument("--device", default="auto")
    q.set_defaults(func=cmd_plot)
    return p


DEFAULTS = {
    "iters": 1000,
    "batch_size": 512,
    "lr": 5e-3,
    "schedule": "cosine",
    "kinetic": 0.0,
    "jacobian": 0.0,
    "ema": 0.995,
    "eval_every": 100,
}
"""Training defaults of ``cnf train``, chosen for the 3-minute budget on 2 CPU cores: a large
batch with a high, cosine-decayed learning rate and an EMA of the weights converges in 1000
iterations to within 0.01 (8gaussians), 0.04 (pinwheel) and 0.2 nats (checkerboard) of the
entropy (``scripts/quality_toy.py``)."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .train import CheckpointError, TrainingError

    try:
        return args.func(args)
    except (CheckpointError, TrainingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # e.g. --resume with a checkpoint of a different architecture
        if "state_dict" not in str(exc):
            raise
        print(f"error: the checkpoint does not fit this model ({str(exc)[:300]})", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
