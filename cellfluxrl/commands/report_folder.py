"""The ``evaluate --out`` folder: written whole, never over the user's files, with what it stands on.

``evaluate`` builds its report in a hidden sibling ``.OUT.partial-HOST-PID-XXXX`` (the partial-folder
convention of :mod:`cellfluxrl.data.resume`, whose dead leftovers are removed) and swaps it in
when it is complete, so ``OUT`` holds either the previous report or the new one, never a mix (no
stale ``*_ood.png`` beside a report without an OOD section). ``OUT`` must be absent, empty, or
hold only a previous report (:data:`REPORT_FILES`); anything else is refused before any sampling.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from cellfluxrl.errors import CellfluxError

# What evaluate writes (evaluation.report_text: report.json/.md; evaluation.report_figures: fig4_grid*.png,
# fig5_best_of_n*.png).
REPORT_FILES = ("report.json", "report.md", "fig*.png")


def check_writable_folder(out: Path, option: str = "--out") -> None:
    """Refuse an output folder whose report cannot be written (one line naming it); creates nothing.

    The report is built beside ``out`` and renamed into place, so the nearest existing folder above
    ``out`` must be a writable folder.
    """
    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or (out.exists() and not out.is_dir()):
        bad = out if out.exists() and not out.is_dir() else folder
        raise CellfluxError(f"{option} {out}: cannot write in {bad} (not a folder)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CellfluxError(f"{option} {out}: cannot write in {folder} (Permission denied)")


def read_report(path: Path) -> dict:
    """A ``report.json`` as a dict with ``settings`` and ``sections``, or one line naming the file."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CellfluxError(f"{path}: not a readable report ({type(exc).__name__}: {exc}); delete it to evaluate "
                            f"again") from None
    if not isinstance(report, dict) or not isinstance(report.get("settings"), dict) \
            or not isinstance(report.get("sections"), dict) or not report["sections"]:
        raise CellfluxError(f"{path}: not a cellfluxrl report (no 'settings'/'sections'); delete it to evaluate again")
    return report


def check_report_folder(out: Path) -> bool:
    """Whether ``out`` holds a previous report (to be replaced whole); refuse anything else.

    Raises:
        CellfluxError: a file, a dataset, a foreign file, or a report.json that is not a cellfluxrl report.
    """
    from cellfluxrl.rundir import check_owned

    if not check_owned(out, "evaluate", REPORT_FILES, "--out"):
        return False
    if not (out / "report.json").is_file():
        raise CellfluxError(f"--out {out} holds files but no report.json; choose a new or empty folder")
    read_report(out / "report.json")
    return True


def staged_folder(out: Path) -> Path:
    """A new hidden sibling folder to build the report in (dead ones of killed runs are removed first)."""
    from cellfluxrl.data.layout import follow_umask
    from cellfluxrl.data.partials import partial_prefix, remove_stale_partials

    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    try:
        staged = Path(tempfile.mkdtemp(prefix=f"{partial_prefix(out)}{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise CellfluxError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or exc})") from None
    follow_umask(staged)
    return staged


def replace_folder(staged: Path, out: Path) -> None:
    """Put the finished ``staged`` folder in ``out``'s place (the previous report is removed)."""
    out = out.absolute()
    old = None
    if out.exists():
        old = out.with_name(f"{staged.name}.old")
        os.replace(out, old)
    os.replace(staged, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard(staged: Path) -> None:
    """Remove an unfinished staged folder."""
    shutil.rmtree(staged, ignore_errors=True)


def _run_digest(run: Path) -> str:
    """The weights digest of a run's evaluated (EMA, else raw) weights."""
    from cellfluxrl.checkpoint import load_checkpoint
    from cellfluxrl.provenance import weights_digest

    state = load_checkpoint(Path(run))
    return weights_digest(state["ema"] if "ema" in state else state["model"])


def reference_changes_of(runs: list[Path], configs: list[dict], dataset: Path) -> list[str]:
    """What changed under the post-trained runs about to be evaluated, one phrase each (run named).

    A posttrain run evaluated on its own dataset must find the evaluators it was rewarded by; one
    evaluated beside its base run folder must find the base weights it started from (else the
    paired differences compare it with another model).
    """
    from cellfluxrl.provenance import evaluator_digests, reference_changes, require_fingerprint

    evaluated = {Path(run).resolve(): run for run in runs}
    found = []
    for run, config in zip(runs, configs):
        stored = require_fingerprint(config.get("fingerprints"), f"{run}/config.json")
        if config.get("kind") != "posttrain" or not stored:
            continue
        own_data = config.get("dataset") and Path(config["dataset"]).resolve() == Path(dataset).resolve()
        base = evaluated.get(Path(stored.get("base_run", "")).resolve()) if stored.get("base_run") else None
        current = {"base_weights": _run_digest(base) if base is not None else stored.get("base_weights"),
                   "evaluators": evaluator_digests(dataset) if own_data else stored.get("evaluators")}
        found += [f"run {run}: {change}" for change in reference_changes(stored, current, dataset)]
    return found


def report_fingerprints(runs: list[Path], names: list[str], configs: list[dict], dataset: Path,
                        accepted: list[str]) -> dict:
    """``report.json["settings"]["fingerprints"]``: the evaluators, each run's weights and reference,
    and the reference changes the user accepted (``--allow-changed-reference``)."""
    from cellfluxrl.provenance import evaluator_digests

    return {"evaluators": evaluator_digests(dataset),
            "runs": {name: {"weights": _run_digest(run), "reference": config.get("fingerprints")}
                     for run, name, config in zip(runs, names, configs)},
            "accepted_reference_changes": list(accepted)}
