"""``cnf train --resume``: what a run continues with. The settings and the model its
checkpoints recorded stand in for the flags left out; flags that contradict them are refused,
all named in one message, before any work."""

from __future__ import annotations

from pathlib import Path

from .common import shown

FLAGS = {
    "iters": "--iters",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "weight_decay": "--weight-decay",
    "schedule": "--schedule",
    "clip_grad": "--clip-grad",
    "kinetic": "--kinetic",
    "jacobian": "--jacobian",
    "ema": "--ema",
    "seed": "--seed",
    "translate": "--translate",
    "coupling": "--coupling",
}
"""The training flags a checkpoint records, by the name it records them under."""

MODEL_FLAGS = {
    "hidden": ("hidden", "--hidden"),
    "activation": ("activation", "--activation"),
    "blocks": ("blocks", "--blocks"),
    "T": ("T", "--T"),
    "fixed_T": ("train_T", "--fixed-T"),
    "trace": ("trace", "--trace"),
    "tol": ("rtol", "--tol"),
    "dtype": ("dtype", "--dtype"),
    "no_standardize": ("standardize", "--no-standardize"),
}
"""The model flags: their attribute, the (generic) spec setting they set, and the flag."""


def resumed(recipe, args, stages, record, spec: dict) -> dict:
    """What ``--resume`` continues with: ``{stage: recorded settings no flag set}`` for each
    stage with a checkpoint, and ``"spec"``, the model it holds.

    Raises:
        ValueError: a checkpoint of other data or another stage, or flags that contradict what
            the checkpoints recorded (all of them named in one message).
    """
    found, conflicts, notes = {}, [], []
    for stage, folder in stages:
        last = folder / "last.pt"
        state = _check_resume(last, record, stage)
        if state is None:
            continue
        given = _given(args, stage)
        found[stage] = {k: v for k, v in _recorded(state).items() if k not in given}
        conflicts += _setting_conflicts(last, state, given, stage, notes)
        if "spec" in state and "spec" not in found:
            found["spec"] = state["spec"]
            conflicts += _model_conflicts(recipe, args, spec, state["spec"], last)
    if conflicts:
        raise ValueError(
            "--resume: these flags contradict the run being resumed: "
            + "; ".join(conflicts)
            + ". Leave them out to continue as it began, or write to another --out"
        )
    for note in notes:
        print(note, flush=True)
    return found


def _given(args, stage: str) -> dict:
    """The settings the flags set explicitly for ``stage``, under the names checkpoints
    record them by (:data:`FLAGS`)."""
    if stage == "finish":
        given = {"iters": args.finish_ml, "seed": args.seed}
    else:
        given = {key: getattr(args, key) for key in FLAGS}
        if stage != "flow-matching":
            given["coupling"] = None
    given["translate"] = args.translate
    given = {key: value for key, value in given.items() if value is not None}
    if given.get("ema") == 0:
        given["ema"] = None  # --ema 0: no average, as fit records it
    return given


def _recorded(state: dict) -> dict:
    """The settings a checkpoint recorded (fewer in those of older versions)."""
    recorded = {**state.get("settings", {}), **state.get("flags", {})}
    if "seed" in state:
        recorded["seed"] = state["seed"]
    return recorded


def _setting_conflicts(last: Path, state: dict, given: dict, stage: str, notes: list) -> list:
    """The flags in ``given`` that contradict the checkpoint ``state``; a new ``--iters``
    beyond the iterations done is applied, and said in ``notes``."""
    recorded, done, conflicts = _recorded(state), int(state["iteration"]), []
    for key, value in given.items():
        flag = "--finish-ml" if stage == "finish" and key == "iters" else FLAGS[key]
        was = recorded.get(key, value)  # not recorded (an older checkpoint): fit decides
        if key == "iters" and value < done:
            conflicts.append(f"{flag} {value}, but {last} has {done} iterations done")
        elif key == "iters" and value != was:
            how = "extends" if value > was else "shortens"
            notes.append(f"resuming {last}: {flag} {value} {how} the run of {was} iterations")
        elif value != was:
            conflicts.append(f"{flag} {shown(value)}, but {last} was trained with {shown(was)}")
    return conflicts


def _model_conflicts(recipe, args, spec: dict, before: dict, last: Path) -> list:
    """The model flags given that contradict the model spec of the checkpoint ``last``."""
    from ..models import settings_of

    new, old = (settings_of(s) for s in (spec, before))
    conflicts = []
    for attr, (setting, flag) in MODEL_FLAGS.items():
        key = recipe.aliases.get(setting, setting)
        value = getattr(args, attr)
        if value in (None, False) or new.get(key) == old.get(key):
            continue
        was = "its model's own" if old.get(key) is None else shown(old[key])
        spelled = "" if value is True else f" {shown(value)}"
        conflicts.append(f"{flag}{spelled}, but {last} holds a model with {setting} {was}")
    return conflicts


def _check_resume(last: Path, record, stage: str) -> dict | None:
    """The checkpoint ``last`` of a run to resume (None: none yet, a fresh run); refuses to
    continue a run on other data, or with another objective, than it began."""
    from ..recipes import Record
    from ..training import load_checkpoint

    if not last.is_file():
        return None  # nothing to resume: a fresh run
    state = load_checkpoint(last)
    before = Record.from_checkpoint(state, source=str(last))
    keys = ("name", "architecture", "split_seed")
    if any(getattr(before, key) != getattr(record, key) for key in keys):
        raise ValueError(
            f"{last} was trained on {before.name} ({before.architecture}, split seed "
            f"{before.split_seed}); resume it with the same --data, --architecture and "
            "--split-seed, or write to another --out"
        )
    if dict(before.options or {}) != dict(record.options or {}):
        flags = "--columns, --context-columns, --drop-nonfinite and --conditional"
        raise ValueError(
            f"{last} was trained on its data with {_options(before)}, but these flags give "
            f"{_options(record)}; resume with the same {flags}, or write to another --out"
        )
    was = state.get("stage", "likelihood")  # runs before flow matching were all likelihood
    if was != stage:
        raise ValueError(
            f"{last} holds a {was} stage, but these flags train {stage} there; resume with the "
            "flags it began with (--objective, --finish-ml), or write to another --out"
        )
    return state


def _options(record) -> str:
    """A record's loader options as the flags spell them."""
    options = dict(record.options or {})
    if not options:
        return "no data options"
    flags = [(f"--{k.replace('_', '-')}", v) for k, v in sorted(options.items())]
    return ", ".join(flag if v is True else f"{flag} {shown(v)}" for flag, v in flags)
