"""Fingerprints of what a post-trained run stands on: its base run's weights and the dataset's evaluators.

A posttrain run is defined against references it does not own: the base run (its EMA weights are
the start and the frozen KL reference) and ``DATASET/evaluators/`` (the reward classifier and
reference statistics it is rewarded by, the judge it is graded by). Re-pretraining the base or
re-fitting the evaluators between two sessions would silently change the objective mid-run, so
every post-trained checkpoint, its ``config.json`` and every ``report.json`` record::

    {"base_run": "/abs/base", "base_weights": "sha256:...", "evaluators": {"moa_classifier.pt": "sha256:...", ...}}

and a resume or an evaluation compares them with the current files (:func:`reference_changes`),
refusing a change in one line naming it (:func:`check_reference`) unless the user accepts it.

Digests: ``sha256`` of the weights' content (each tensor's name, dtype, shape and bytes, in name
order; independent of the device and of what else the checkpoint holds), and of each evaluator
file's *content* (hidden temp files excluded): a JSON file or a torch file is digested as its
canonical JSON (sorted keys; tensors as dtype, shape and the sha256 of their bytes) without the
timing fields (:data:`TIMING_KEYS`), so a re-fit that only took another number of seconds keeps its
digest while any other change (a statistic, a weight, a seed) changes it. Those digests read
``content-sha256:<hex>``; a file of another kind (or one that does not parse) is digested by its
bytes, ``sha256:<hex>``, the scheme every evaluator digest used before: a fingerprint stored by an
older version is compared with the current file's bytes, so it stays comparable (and a re-fit that
changed only timings is reported to such a run once; accepting it records the new digests).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from cellfluxrl.errors import CellfluxError

EVALUATORS_DIR = "evaluators"
TIMING_KEYS = frozenset({"seconds", "images_per_s"})  # how long a fit took: never part of a digest
CONTENT_PREFIX = "content-sha256:"
BYTES_PREFIX = "sha256:"


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """``"sha256:<hex>"`` of a state dict's tensors (name, dtype, shape, bytes; sorted by name)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def canonical(value: Any) -> Any:
    """``value`` as plain JSON values without its timing fields (:data:`TIMING_KEYS`, at any depth).

    Mappings keep their other keys (as strings), sequences become lists, tensors become
    ``{"dtype", "shape", "sha256"}`` of their bytes; other objects their ``repr``.
    """
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": hashlib.sha256(data).hexdigest()}
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _parsed(path: Path) -> Any:
    """A ``.json`` or torch (``.pt``/``.pth``) file's content, or ``None`` when it is neither or does not parse."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        if path.suffix in (".pt", ".pth"):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any file that does not parse is digested by its bytes
        return None
    return None


def content_digest(path: str | os.PathLike) -> str:
    """``"content-sha256:<hex>"`` of a JSON/torch file's :func:`canonical` content (timings left out);
    ``"sha256:<hex>"`` of the bytes (:func:`file_digest`) for any other file."""
    value = _parsed(Path(path))
    if value is None:
        return file_digest(path)
    text = json.dumps(canonical(value), sort_keys=True, separators=(",", ":"))
    return CONTENT_PREFIX + hashlib.sha256(text.encode()).hexdigest()


def evaluator_digests(dataset_dir: str | os.PathLike) -> dict[str, str]:
    """``{file name: content_digest}`` of every visible file in ``DATASET/evaluators`` (``{}`` when there is none)."""
    folder = Path(dataset_dir) / EVALUATORS_DIR
    if not folder.is_dir():
        return {}
    return {p.name: content_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _same_bytes(stored: str, path: Path) -> bool:
    """Whether a bytes digest stored by an older version still matches the file (content digests: False)."""
    return stored.startswith(BYTES_PREFIX) and path.is_file() and file_digest(path) == stored


def reference_fingerprint(base_run: str | os.PathLike, base_state: Mapping[str, torch.Tensor],
                          dataset_dir: str | os.PathLike) -> dict:
    """What a posttrain run stands on: ``{"base_run", "base_weights", "evaluators"}`` (see the module docstring)."""
    return {"base_run": str(Path(base_run).resolve()), "base_weights": weights_digest(base_state),
            "evaluators": evaluator_digests(dataset_dir)}


def _short(digest: str | None) -> str:
    return "none" if digest is None else digest.split(":", 1)[-1][:12]


def reference_changes(stored: Mapping, current: Mapping, dataset_dir: str | os.PathLike) -> list[str]:
    """What changed between two :func:`reference_fingerprint` dicts, one phrase each (empty: nothing).

    Only the entries ``stored`` has are compared (a fingerprint written before the evaluators were
    fitted has none of them; a missing ``base_weights`` is not compared). An evaluator digest of the
    older bytes scheme is compared with the file's bytes (see the module docstring).
    """
    changes = []
    if stored.get("base_weights") and stored["base_weights"] != current.get("base_weights"):
        changes.append(f"the base run {stored.get('base_run', '?')} has other weights (sha256 "
                       f"{_short(stored['base_weights'])} -> {_short(current.get('base_weights'))}; re-pretrained?)")
    old, new = dict(stored.get("evaluators") or {}), dict(current.get("evaluators") or {})
    folder = Path(dataset_dir) / EVALUATORS_DIR
    for name in sorted(old):
        if name not in new:
            changes.append(f"{folder / name} is gone")
        elif old[name] != new[name] and not _same_bytes(old[name], folder / name):
            changes.append(f"{folder / name} changed (sha256 {_short(old[name])} -> {_short(new[name])}; re-fitted?)")
    return changes


def check_reference(changes: list[str], where: str, flag: str, accept: bool) -> list[str]:
    """Refuse ``changes`` (one line naming the first and counting the rest) unless ``accept``; returns them.

    Args:
        changes: :func:`reference_changes` output.
        where: what is being resumed or evaluated, e.g. ``"posttrain runs/rl"``.
        flag: the option that accepts the change, named in the message.
        accept: the user passed ``flag``.
    """
    if changes and not accept:
        more = f" (and {len(changes) - 1} more change(s))" if len(changes) > 1 else ""
        raise CellfluxError(f"{where}: a reference changed since it was recorded: {changes[0]}{more}; restore it, "
                            f"use a new folder, or pass {flag} to go on against the new one (recorded)")
    return changes


def require_fingerprint(entry, where: str) -> dict:
    """A stored fingerprint entry as a dict (``{}`` for runs that predate fingerprints)."""
    if entry is None:
        return {}
    if not isinstance(entry, dict):
        raise CellfluxError(f"{where}: unreadable fingerprints entry {entry!r}")
    return entry
