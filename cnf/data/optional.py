"""Optional dependencies of the data loaders, imported only when a data set that needs one is
loaded, with the command that installs it when it is missing."""

from __future__ import annotations

from types import ModuleType

__all__ = ["sklearn_datasets"]


def sklearn_datasets(what: str) -> ModuleType:
    """``sklearn.datasets``, for the data set ``what`` (the digits, the bundled tables).

    Raises:
        ImportError: scikit-learn is not installed; the message says how to install it.
    """
    try:
        import sklearn.datasets
    except ImportError as err:
        raise ImportError(
            f"the {what} data set comes with scikit-learn, which is not installed: "
            "pip install scikit-learn (or pip install -e '.[images]' in a checkout of cnf)"
        ) from err
    return sklearn.datasets
