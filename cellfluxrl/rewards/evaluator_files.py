"""The files of ``DATASET/evaluators``: their names and formats, and how they are written.

One owner for the names that the reader (:mod:`cellfluxrl.rewards.evaluators`), the fitter
(:mod:`cellfluxrl.rewards.evaluators_fit`) and the resume check
(:mod:`cellfluxrl.rewards.evaluators_resume`) share; it imports only the layout's umask helper, so
all three sit above it and none imports another in a circle.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cellfluxrl.data.layout import follow_umask

REFERENCE_FILE = "reference_stats.json"
CLASSIFIER_FILE = "moa_classifier.pt"
CLASSIFIER_REPORT = "classifier.json"
JUDGE_FILE = "judge.pt"
JUDGE_WIDTHS = (32, 64, 128)  # another architecture than the reward classifier's (24, 48, 96)
JUDGE_SEED_OFFSET = 1000  # the judge's seed is the dataset seed + this
REFERENCE_FORMAT = "cellfluxrl-reference-stats/1"
FIT_HINT = "run `cellfluxrl prepare ...` (which fits them) or `cellfluxrl rewards fit DATASET`"


def jsonable(value: Any) -> Any:
    """Round-trip through JSON so stored and fresh settings compare equal (tuples -> lists)."""
    return json.loads(json.dumps(value))


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically (temp file + os.replace)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(payload, indent=2) + "\n")
    follow_umask(tmp)  # mkstemp files are private whatever the umask
    os.replace(tmp, path)
