"""The ``cnf`` command line: ``cnf train | eval | sample | plot``.

Flag parsing over the recipe table (:mod:`cnf.recipes`): ``cnf train`` looks up the recipe of
``--data`` and ``--architecture``, replaces what the flags set, and calls
:func:`cnf.training.fit` with the recipe's keywords, as Python code would. Its checkpoints store
the recipe's :class:`cnf.recipes.Record`, from which ``cnf eval`` and ``cnf plot`` rebuild the
split the model was trained on. argparse lives in this package and nowhere else.

Modules: :mod:`~cnf.cli.flags` (the parser), :mod:`~cnf.cli.train` (``cnf train``),
:mod:`~cnf.cli.resume` (``--resume``), :mod:`~cnf.cli.trained` (``cnf eval | sample | plot``),
:mod:`~cnf.cli.pictures` (the pictures), :mod:`~cnf.cli.common` (what the commands share).
"""

from __future__ import annotations

import sys

from .flags import build_parser

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command of ``argv`` (default: ``sys.argv[1:]``); the exit status: 0, or 2 after
    an error message on stderr."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # cnf train --nproc N launches the same command in N processes
    from ..ode import SolverError
    from ..training import CheckpointError, TrainingError

    try:
        return args.func(args)
    except (CheckpointError, TrainingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except SolverError as exc:  # e.g. evaluating a model too stiff for the tolerance asked
        print(f"error: the ODE solver failed: {exc}", file=sys.stderr)
    except OSError as exc:  # a full disk, a file that vanished, no permission
        print(f"error: {exc}", file=sys.stderr)
    except ImportError as exc:  # an optional dependency (pandas for GAS, h5py for BSDS300)
        print(f"error: {exc}", file=sys.stderr)
    return 2
