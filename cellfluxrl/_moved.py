"""Old module paths that still import for one release (the layout of issue 14 moved them).

``import cellfluxrl.model.unet`` (or ``from cellfluxrl.posttrain import PosttrainConfig``) warns with a
:class:`DeprecationWarning` naming the new path and gives the new module itself (the same object,
so its attributes and anything patched on it agree), or, for a module that was split in several,
a stand-in holding the public names of its parts (other names are looked up in the parts). The
package never imports an old path (tests/test_architecture.py checks); docs/architecture.md lists
the moves. Only the standard library is imported here: ``import cellfluxrl`` stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old module -> the new module(s) holding its names (several: the module was split)
MOVED: dict[str, tuple[str, ...]] = {
    "cellfluxrl.unet": ("cellfluxrl.model.unet",),
    "cellfluxrl.path": ("cellfluxrl.model.path",),
    "cellfluxrl.sampler": ("cellfluxrl.model.sampler",),
    "cellfluxrl.losses": ("cellfluxrl.model.losses",),
    "cellfluxrl.generate": ("cellfluxrl.model.generate",),
    "cellfluxrl.pretrain": ("cellfluxrl.model.pretrain",),
    "cellfluxrl.segment": ("cellfluxrl.rewards.segmentation.base", "cellfluxrl.rewards.segmentation.classical",
                           "cellfluxrl.rewards.segmentation.accuracy"),
    "cellfluxrl.segment_cellpose": ("cellfluxrl.rewards.segmentation.cellpose_backend",),
    "cellfluxrl.cell_seeds": ("cellfluxrl.rewards.segmentation.cell_seeds",),
    "cellfluxrl.morphology": ("cellfluxrl.rewards.morphology",),
    "cellfluxrl.moa_classifier": ("cellfluxrl.rewards.moa_classifier",),
    "cellfluxrl.degradations": ("cellfluxrl.rewards.degradations",),
    "cellfluxrl.evaluators": ("cellfluxrl.rewards.evaluators",),
    "cellfluxrl.evaluators_resume": ("cellfluxrl.rewards.evaluators_resume",),
    "cellfluxrl.refstats": ("cellfluxrl.rewards.refstats",),
    "cellfluxrl.data.raw_fields": ("cellfluxrl.data.bbbc021.fields",),
    "cellfluxrl.nft": ("cellfluxrl.rl.nft",),
    "cellfluxrl.posttrain": ("cellfluxrl.rl.config", "cellfluxrl.rl.rollouts", "cellfluxrl.rl.reward_worker",
                             "cellfluxrl.rl.step", "cellfluxrl.rl.sample_grid", "cellfluxrl.rl.loop"),
    "cellfluxrl.evaluate": ("cellfluxrl.evaluation.pipeline", "cellfluxrl.evaluation.scoring",
                            "cellfluxrl.evaluation.candidates", "cellfluxrl.evaluation.report",
                            "cellfluxrl.evaluation.report_text", "cellfluxrl.evaluation.report_figures"),
    "cellfluxrl.report": ("cellfluxrl.evaluation.report", "cellfluxrl.evaluation.report_text",
                          "cellfluxrl.evaluation.report_figures"),
    "cellfluxrl.metrics": ("cellfluxrl.evaluation.metrics",),
    "cellfluxrl.candidates": ("cellfluxrl.evaluation.candidates",),
    "cellfluxrl.inception": ("cellfluxrl.evaluation.inception",),
    "cellfluxrl.figures": ("cellfluxrl.evaluation.figures",),
}


def _importer_level() -> int:
    """``stacklevel`` that makes the warning point at the import line: the first frame outside this
    file and ``importlib`` (``warnings`` itself skips the import system's ``_bootstrap`` frames)."""
    frame, level = sys._getframe(2), 2  # level 1 is our caller, the loader

    def bootstrap(f) -> bool:
        return "importlib" in f.f_code.co_filename and "_bootstrap" in f.f_code.co_filename

    while frame is not None and (bootstrap(frame) or frame.f_code.co_filename in (__file__, importlib.__file__)):
        level += 0 if bootstrap(frame) else 1
        frame = frame.f_back
    return level


class _AliasLoader(importlib.abc.Loader):
    """Creates the old module as the new one (or a stand-in re-exporting the parts)."""

    def __init__(self, targets: tuple[str, ...]):
        self.targets = targets
        self.spec = None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {' + '.join(self.targets)}; import it from there (the old path "
                      f"is removed in the next release)", DeprecationWarning, stacklevel=_importer_level())
        parts = [importlib.import_module(name) for name in self.targets]
        if len(parts) == 1:
            self.spec = parts[0].__spec__  # the import system overwrites __spec__; exec_module restores it
            return parts[0]
        stand_in = types.ModuleType(spec.name, f"Deprecated: the parts of {spec.name} are {', '.join(self.targets)}.")
        for part in parts:  # the first part holding a name wins (the targets are listed main part first)
            names = getattr(part, "__all__", None) or [n for n in vars(part) if not n.startswith("_")]
            for name in names:
                if not hasattr(stand_in, name):
                    setattr(stand_in, name, getattr(part, name))

        def __getattr__(name: str):
            for part in parts:
                if hasattr(part, name):
                    return getattr(part, name)
            raise AttributeError(f"module {spec.name!r} has no attribute {name!r}")

        stand_in.__getattr__ = __getattr__
        return stand_in

    def exec_module(self, module) -> None:
        if self.spec is not None:
            module.__spec__ = self.spec


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(MOVED[fullname]))


def install() -> None:
    """Let the old paths import (idempotent; called by ``cellfluxrl/__init__.py``)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
