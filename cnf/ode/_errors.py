"""Exceptions raised by the solver core."""

from __future__ import annotations

__all__ = ["SolverError"]


class SolverError(RuntimeError):
    """The solver could not finish: the step size underflowed, too many steps were needed, or
    the solution stopped being finite.

    Attributes:
        t: the time reached when the solve stopped.
        step_size: the last step size tried.
    """

    def __init__(self, message: str, *, t: float, step_size: float) -> None:
        super().__init__(message)
        self.t = t
        self.step_size = step_size
