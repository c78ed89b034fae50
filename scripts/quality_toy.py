"""Train the main job's default model on every 2-D data set and tabulate the quality.

    python scripts/quality_toy.py [--data 8gaussians pinwheel ...] [--out runs/quality]

Each data set runs exactly what ``cnf train --data NAME`` runs (the CLI's defaults), then
``cnf eval`` (exact trace, 20000 fresh samples, tolerance 1e-7). The table gives the test NLL
in nats, the gap to the entropy where it is known, the wall time of training and the mean
forward/backward NFE per iteration; it is printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cnf.cli import main as cli
from cnf.data import NAMES


def run(name: str, out: Path, extra: list[str]) -> dict:
    folder = out / name
    tic = time.perf_counter()
    code = cli(["train", "--data", name, "--out", str(folder), "--quiet", "--no-gif", *extra])
    seconds = time.perf_counter() - tic
    if code != 0:
        raise SystemExit(f"training {name} failed with exit code {code}")
    history = json.loads((folder / "history.json").read_text())
    result_file = folder / "eval.json"
    cli(["eval", "--checkpoint", str(folder / "last.pt"), "--json", str(result_file)])
    result = json.loads(result_file.read_text())
    n = len(history["iteration"])
    result.update(
        train_seconds=seconds,
        loop_seconds=sum(history["seconds"]),
        nfe_forward=sum(history["nfe_forward"]) / n,
        nfe_backward=sum(history["nfe_backward"]) / n,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=list(NAMES))
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("extra", nargs="*", help="extra `cnf train` flags, after --")
    args = parser.parse_args()
    rows = [
        "| data | test NLL (nats) | entropy | gap | train time (s) | fwd NFE | bwd NFE |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.data:
        r = run(name, Path(args.out), args.extra)
        entropy = f"{r['entropy']:.3f}" if "entropy" in r else "-"
        gap = f"{r['gap']:.3f}" if "gap" in r else "-"
        rows.append(
            f"| {name} | {r['nll']:.3f} | {entropy} | {gap} | {r['train_seconds']:.0f} | "
            f"{r['nfe_forward']:.1f} | {r['nfe_backward']:.1f} |"
        )
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
