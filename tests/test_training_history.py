"""History of cnf.training: named columns that stay aligned, round trips, older dictionaries."""

from __future__ import annotations

import copy
import math
import pickle

import pytest

from cnf.training import History


def _history() -> History:
    h = History()
    h.record(1, loss=3.0, seconds=0.1, nll=3.0)
    h.record(2, loss=2.0, seconds=0.1, nll=2.0, fm_loss=5.0)  # a metric that starts late
    h.record(3, loss=1.0, seconds=0.1, fm_loss=4.0)  # and one that stops
    h.record_eval(2, nll=2.5)
    return h


def test_columns_stay_aligned_with_nan_where_a_metric_is_missing():
    h = _history()
    assert h.iteration == [1, 2, 3] and h.loss == [3.0, 2.0, 1.0]
    assert h.nll[:2] == [3.0, 2.0] and math.isnan(h.nll[2])
    assert math.isnan(h.fm_loss[0]) and h.fm_loss[1:] == [5.0, 4.0]
    assert h.eval_iteration == [2] and h.eval_nll == [2.5]
    assert len(h) == 3
    assert h.last() == {
        "iteration": 3,
        "loss": 1.0,
        "seconds": 0.1,
        "nll": h.nll[2],
        "fm_loss": 4.0,
    }


def test_round_trips():
    h = History()
    h.record(1, loss=3.0, seconds=0.1, nll=3.0, nfe_forward=20)
    h.record_eval(1, nll=2.9)
    assert History.from_dict(h.to_dict()) == h
    assert pickle.loads(pickle.dumps(h)) == h
    assert copy.deepcopy(h) == h
    assert h.to_dict() is not h.to_dict() and h.to_dict()["loss"] is not h.loss


def test_reads_the_dictionaries_of_older_checkpoints():
    old = {
        "iteration": [1, 2],
        "loss": [2.0, 1.5],
        "nll": [2.0, 1.5],
        "nfe_forward": [20, 26],
        "nfe_backward": [30, 32],
        "seconds": [0.2, 0.2],
        "eval_iteration": [2],
        "eval_nll": [1.6],
    }
    h = History.from_dict(old)
    assert h.to_dict() == old and h.nfe_backward == [30, 32]


def test_columns_of_different_lengths_are_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        History.from_dict({"iteration": [1, 2], "loss": [1.0]})


def test_improved_compares_with_every_earlier_evaluation():
    h = History()
    assert not h.improved()
    for score, better in [(3.0, True), (1.0, True), (2.0, False), (1.0, False), (0.5, True)]:
        h.record_eval(len(h.eval_nll) + 1, nll=score)
        assert h.improved() is better, score


def test_unknown_metric_names_the_known_ones():
    with pytest.raises(AttributeError, match=r"no metric 'kinetic'.*'nll'"):
        _history().kinetic  # noqa: B018


def test_plot_curves_reads_the_dictionary():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from cnf.plot import plot_curves

    h = _history()
    h.record_eval(3, nll=2.0)
    plt.close(plot_curves(h.to_dict()))
