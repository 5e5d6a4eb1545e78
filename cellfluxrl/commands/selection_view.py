"""What the commands show of a posttrain run's checkpoint selection: which checkpoint was loaded, the
validation curve beside the training reward (``info``), and its plot ``RUN/validation.png`` (``posttrain``).

The selection itself is :mod:`cellfluxrl.rl.selection`; this module only reads what it left in
``checkpoint.pt`` (``selection``) and ``stats.jsonl`` (the ``val_*`` keys of the validated steps).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cellfluxrl.commands.wording import count
from cellfluxrl.rewards.weights import DEFAULT_WEIGHTS
from cellfluxrl.rundir.owned import VALIDATION_PLOT_MARK

PLOT_NAME = "validation.png"
PLOT_MARK = VALIDATION_PLOT_MARK  # the PNG's Software text, by which rundir.owned recognises it
PAPER_WEIGHTS = DEFAULT_WEIGHTS  # the overall reward of the curve (cellfluxrl.rl.selection.PAPER_WEIGHTS)


def checkpoint_line(loaded) -> str:
    """Which checkpoint of a run was loaded, for the user (a :class:`cellfluxrl.checkpoint.LoadedRun`).

    E.g. ``"the selected checkpoint (step 40 of 60: validation overall 5.12 [s.e. 0.03]; --checkpoint
    last for step 60)"`` or ``"the last checkpoint (step 60; the run predates checkpoint selection)"``.
    """
    sel, last = loaded.selection or {}, loaded.step if loaded.last_step is None else loaded.last_step
    if loaded.checkpoint == "best":
        return (f"the selected checkpoint (step {loaded.step} of {last}: validation overall "
                f"{sel.get('best_overall') or float('nan'):.4g} [s.e. {sel.get('best_se') or 0.0:.2g}]; "
                f"--checkpoint last for step {last})")
    if sel.get("best_step") is not None:
        why = f"asked for; the selected one is step {sel['best_step']}"
    elif loaded.kind != "posttrain":
        why = f"a {loaded.kind} run selects none"
    elif sel.get("status") == "off":
        why = f"checkpoint selection {sel.get('reason', 'off')}"
    else:
        why = "none selected yet" if sel else "the run predates checkpoint selection"
    return f"the last checkpoint (step {loaded.step}; {why})"


def read_records(path: Path) -> list[dict]:
    """The readable JSON objects of a ``stats.jsonl`` (a line cut short by a kill is skipped)."""
    records = []
    if not Path(path).is_file():
        return records
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def train_overall(record: dict) -> float | None:
    """The paper-weighted overall reward of a step's rollouts (from its ``reward/NAME`` means), or
    ``None`` when the run did not score all seven rewards (then its ``reward`` is another sum)."""
    values = [record.get(f"reward/{name}") for name in PAPER_WEIGHTS]
    if any(not isinstance(v, (int, float)) for v in values):
        return None
    return float(sum(w * v for w, v in zip(PAPER_WEIGHTS.values(), values)))


def validation_curve(records: list[dict]) -> list[dict]:
    """One row per validated step: ``step``, ``val_overall``, ``val_overall_se``, ``train_overall``
    (the same step's rollouts, paper-weighted; ``None`` when not all seven were scored), ``selected``
    (whether the rule selected it then) and ``best_step`` (the selected step after it)."""
    return [{"step": r["step"], "val_overall": float(r["val_overall"]), "val_overall_se": r.get("val_overall_se"),
             "train_overall": train_overall(r), "selected": bool(r.get("val_selected")),
             "best_step": r.get("val_best_step")}
            for r in records if isinstance(r.get("val_overall"), (int, float))]


def selection_facts(selection: dict | None, records: list[dict]) -> dict:
    """What ``info`` shows of a posttrain run's selection: the checkpoint's ``selection`` entry
    (without the per-pair scores) and the validation curve of its ``stats.jsonl``."""
    facts = {k: v for k, v in (selection or {}).items() if k != "best_scores"}
    if not selection:
        facts = {"status": "none (the run predates checkpoint selection)"}
    facts["curve"] = validation_curve(records)
    return facts


def selection_lines(facts: dict) -> list[str]:
    """The ``info`` lines of :func:`selection_facts`: the rule, the selected step, the curve."""
    if facts.get("status") != "on":
        return [f"  checkpoint selection: {facts.get('reason') or facts.get('status')}; sample and evaluate use the "
                f"last checkpoint"]
    lines = [f"  checkpoint selection: every {count(facts.get('every') or 0, 'iteration')} on "
             f"{count(facts.get('pairs') or 0, 'val-select pair')} x {count(facts.get('k') or 0, 'draw')}; "
             f"{facts.get('rule')}"]
    if facts.get("best_step") is None:
        lines.append("  selected: none yet (sample and evaluate use the last checkpoint)")
    else:
        lines.append(f"  selected: step {facts['best_step']} (validation overall {facts.get('best_overall'):.4g} "
                     f"[s.e. {facts.get('best_se') or 0.0:.2g}]); sample and evaluate use it unless --checkpoint last")
    if facts["curve"]:
        lines.append("  validation curve (paper-weighted overall): step  val [s.e.]  train rollouts")
        for row in facts["curve"]:
            train = "-" if row["train_overall"] is None else f"{row['train_overall']:.4g}"
            mark = "  <- selected" if row["step"] == facts.get("best_step") else ""
            lines.append(f"    {row['step']:>6}  {row['val_overall']:.4g} [{row['val_overall_se'] or 0.0:.2g}]  "
                         f"{train}{mark}")
    return lines


def validation_plot(records: list[dict], best_step: int | None):
    """The figure: the training rollouts' overall reward per step (thin) and the validation overall
    with +-1 s.e. bars at the validated steps, the selected step marked; ``None`` without validations."""
    curve = validation_curve(records)
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    train = [(r["step"], train_overall(r)) for r in records if train_overall(r) is not None]
    if train:
        ax.plot(*zip(*train), lw=0.8, color="0.6", label="training rollouts (train pairs, old policy)")
    ax.errorbar([r["step"] for r in curve], [r["val_overall"] for r in curve],
                yerr=[r["val_overall_se"] or 0.0 for r in curve], marker="o", ms=4, capsize=3, color="C0",
                label="validation (val-select pairs, EMA), +-1 s.e. of the level\n(the rule uses the smaller s.e. of "
                      "the paired gain)")
    if best_step is not None:
        ax.axvline(best_step, color="C3", ls="--", lw=1, label=f"selected: step {best_step}")
    ax.set_xlabel("RL iteration")
    ax.set_ylabel("overall reward (paper weights)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def write_validation_plot(run_dir: Path, best_step: int | None) -> Path | None:
    """Draw :func:`validation_plot` from ``RUN/stats.jsonl`` into ``RUN/validation.png`` (temp file +
    rename); nothing when the run has no validation yet. Returns the path written, or ``None``."""
    from cellfluxrl.rundir import temp_path

    fig = validation_plot(read_records(Path(run_dir) / "stats.jsonl"), best_step)
    if fig is None:
        return None
    path = Path(run_dir) / PLOT_NAME
    tmp = temp_path(path)
    try:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": PLOT_MARK})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
