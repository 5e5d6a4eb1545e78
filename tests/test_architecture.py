"""The layout's rules, checked on the real source tree (docs/architecture.md).

Every module of ``cellfluxrl/`` is parsed with ``ast`` (imports inside functions included), so a
new file that breaks a rule fails here: (a) no module over ``MAX_LINES`` lines, (b) imports only go
down the layers ``plumbing < data < model < rewards < rl < evaluation < app``, (c) no import cycle,
neither among the imports that run when a module is imported nor among all of them (lazy imports
inside functions included), (d) the old module paths of the issue-14 move are gone: nothing
imports or names them, and importing one fails, and (e) ``benchmarks/`` holds the speed and memory
checks and ``experiments/`` the science scripts, each with a results file that opens with what holds
at HEAD; the scripts import only the package and their own folder; every script path and results
section the repository cites exists.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cellfluxrl"
MAX_LINES = 400

LAYERS = ("plumbing", "data", "model", "rewards", "rl", "evaluation", "app")
# Top-level modules and where they sit. ``checkpoint`` rebuilds the model's network from a run,
# so it is at the model layer: data and plumbing must not import it.
TOP_LEVEL = {
    "cellfluxrl": "plumbing", "errors": "plumbing", "config": "plumbing", "config_toml": "plumbing",
    "distributed": "plumbing", "images": "plumbing", "progress": "plumbing", "grids": "plumbing",
    "export": "plumbing",
    "rundir": "plumbing", "checkpoint": "model", "provenance": "model", "cli": "app", "commands": "app",
    "data": "data", "model": "model", "rewards": "rewards", "rl": "rl", "evaluation": "evaluation",
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    """Every module and package of the package: dotted name -> file."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    top = module.split(".")[1] if "." in module else module
    if top not in TOP_LEVEL:
        raise AssertionError(f"{module}: a new top-level module; give it a layer in TOP_LEVEL and docs/architecture.md")
    return TOP_LEVEL[top]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module, module_level: bool):
    """Import statements: all of them, or only those run when the module is imported (top-level
    statements, and inside top-level if/try/with/class bodies, but not in functions or under
    ``if TYPE_CHECKING``)."""
    if not module_level:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                stack.extend(getattr(node, field, []) or [])


def imported(path: Path, name: str, module_level: bool = False) -> list[tuple[int, str]]:
    """``(line, target)`` for every first-party import in a file; a target that is not a module of
    the tree is returned as written (so an old path shows up as unknown)."""
    known = modules()
    is_package = path.name == "__init__.py"
    out = []
    for node in _import_nodes(ast.parse(path.read_text(), str(path)), module_level):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        out.extend((node.lineno, t) for t in dict.fromkeys(targets) if t == "cellfluxrl" or t.startswith("cellfluxrl."))
    return out


def test_the_tree_is_parsed():
    """The checks below see the real tree (a broken walk would pass every rule vacuously)."""
    names = modules()
    assert len(names) > 60
    for expected in ("cellfluxrl.cli", "cellfluxrl.data.layout", "cellfluxrl.model.unet", "cellfluxrl.rewards.suite",
                     "cellfluxrl.rewards.segmentation.base"):
        assert expected in names
    assert ("cellfluxrl.errors" in {t for _, t in imported(names["cellfluxrl.rewards.registry"],
                                                            "cellfluxrl.rewards.registry")})


def test_no_module_is_over_the_line_budget():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along their jobs): {long}"


def test_every_first_party_import_names_a_module_of_the_tree():
    """The package itself never imports an old (moved) path or a module that does not exist."""
    known = modules()
    bad = [f"{name}:{line} imports {target}" for name, path in known.items()
           for line, target in imported(path, name) if target not in known]
    assert not bad, "\n".join(bad)


def test_imports_go_down_the_layers_only():
    """data < model < rewards < rl < evaluation < commands/cli; plumbing below everything. Imports
    inside functions count too (a lazy import is still a dependency)."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for name, path in modules().items():
        for line, target in imported(path, name):
            if target in modules() and rank[layer(target)] > rank[layer(name)]:
                bad.append(f"{name}:{line} ({layer(name)}) imports {target} ({layer(target)})")
    assert not bad, "imports up the layers:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_at_module_level():
    """No two modules import each other (directly or around a loop) when they are imported. A lazy
    import inside a function may point back (the segmentation factory imports its backends that way)."""
    graph = {name: {t for _, t in imported(path, name, module_level=True) if t in modules() and t != name}
             for name, path in modules().items()}
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


def test_every_subpackage_says_what_it_owns_and_may_import():
    for name, path in modules().items():
        if path.name == "__init__.py" and name != "cellfluxrl":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert doc and re.search(r"may import|import(s)? (nothing|only)", doc, re.IGNORECASE), name


def test_every_torch_load_is_weights_only_and_nothing_pickles():
    """Checkpoints hold plain state dicts and Python types, so moving a class never breaks a run."""
    bad = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if owner == "torch" and node.func.attr == "load" and keywords.get("weights_only") != "True":
                    bad.append(f"{name}:{node.lineno} torch.load without weights_only=True")
                if node.func.attr == "load" and owner == "np" and keywords.get("allow_pickle") == "True":
                    bad.append(f"{name}:{node.lineno} np.load(allow_pickle=True)")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names):
                    bad.append(f"{name}:{node.lineno} imports pickle")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_at_all():
    """No cycle even through lazy imports inside functions: every shared name has one owner below
    its users (the segmentation backends are loaded by ``factory``, which no backend imports; the
    dataset resume check and the evaluator files sit above or below the modules they serve)."""
    graph = {name: {t for _, t in imported(path, name) if t in modules() and t != name}
             for name, path in modules().items()}
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


# ---------------------------------------------------------------------------------------------
# Old paths (moved in issue 14; no release shipped them, so there are no shims).

OLD_PATHS = ("cellfluxrl.unet", "cellfluxrl.path", "cellfluxrl.sampler", "cellfluxrl.losses", "cellfluxrl.generate",
             "cellfluxrl.pretrain", "cellfluxrl.segment", "cellfluxrl.segment_cellpose", "cellfluxrl.cell_seeds",
             "cellfluxrl.morphology", "cellfluxrl.moa_classifier", "cellfluxrl.degradations",
             "cellfluxrl.evaluators", "cellfluxrl.evaluators_resume", "cellfluxrl.refstats",
             "cellfluxrl.data.raw_fields", "cellfluxrl.nft", "cellfluxrl.posttrain", "cellfluxrl.evaluate",
             "cellfluxrl.report", "cellfluxrl.metrics", "cellfluxrl.candidates", "cellfluxrl.inception",
             "cellfluxrl.figures", "cellfluxrl._moved")


def test_the_repository_uses_the_new_paths():
    """Tests, benchmarks, experiments, the plugin, docs and README name only the current module paths."""
    old = "|".join(re.escape(name) for name in sorted(OLD_PATHS, key=len, reverse=True))
    pattern = re.compile(rf"\b(?:{old})\b")
    files = [*ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/**/*.py"), *ROOT.glob("experiments/**/*.py"),
             *ROOT.glob("plugins/**/*.py"),
             *ROOT.glob("plugins/**/*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("data/*.md"), ROOT / "README.md",
             *PACKAGE.rglob("*.py")]
    bad = []
    for path in files:
        if path == Path(__file__).resolve():
            continue
        for k, text in enumerate(path.read_text().splitlines(), 1):
            if path.suffix == ".md":  # file paths too: cellfluxrl/segment.py
                text = text.replace("cellfluxrl/", "cellfluxrl.")
            bad.extend(f"{path.relative_to(ROOT)}:{k}: {m.group(0)}" for m in pattern.finditer(text))
    assert not bad, "old module paths:\n" + "\n".join(bad)


@pytest.mark.parametrize("old", OLD_PATHS)
def test_old_paths_are_not_in_the_package(old):
    """No module, shim or package of the tree answers to an old path (an editable install of another
    checkout on the path may still find one there, so the tree itself is what is checked)."""
    assert old not in modules()
    spec = importlib.util.find_spec(old)
    assert spec is None or PACKAGE not in Path(spec.origin or "").resolve().parents, spec


def test_rewards_and_cli_import_no_torch():
    """The plugin contract and the CLI's start-up stay light (``cellfluxrl --help`` is fast)."""
    code = ("import sys, cellfluxrl.rewards, cellfluxrl.cli, cellfluxrl.rewards.segmentation, cellfluxrl.data, "
            "cellfluxrl.model, cellfluxrl.rl, cellfluxrl.evaluation; "
            "print(sorted(m for m in ('torch', 'numba', 'cellpose') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# benchmarks/ (speed and memory) and experiments/ (the science), issue 29 item 19.

BENCHMARKS, EXPERIMENTS = ROOT / "benchmarks", ROOT / "experiments"
SPEED_SCRIPTS = ("eval_memory.py", "gpu_check.py")  # the speed and memory checks that are no pytest-benchmark suite
SCIENCE_SCRIPTS = ("classifier_robustness.py", "gradient_snr.py", "nucleus_artefacts.py", "nucleus_sizes.py",
                   "reward_correlation.py", "rl_compare.py", "rl_experiment.py", "rl_table.py", "sampler_steps.py",
                   "sampling_curve.py")
HEAD_PAGE, HISTORY = "## What holds at HEAD", "## History (dated; a newcomer can skip)"
HEAD_PAGE_LINES = 60  # "one page"
# Texts that cite script paths and results sections (CHANGELOG.md is history: it keeps the paths of its day).
CITING = ("README.md", "docs/*.md", "data/*.md", "configs/*", "plugins/**/*.py", "plugins/**/*.md", "tests/**/*.py",
          "cellfluxrl/**/*.py", "benchmarks/*", "experiments/*")
PLACEHOLDERS = {"bench_x"}  # docs/segmentation.md: `benchmarks/bench_x.py`


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith((".", "__"))}


def test_benchmarks_hold_only_speed_and_memory_checks():
    """bench_*.py pytest-benchmark suites, the two speed and memory scripts and their RESULTS.md."""
    names = _entries(BENCHMARKS)
    assert {"bench_model.py", "bench_rewards.py", "bench_evaluate.py", *SPEED_SCRIPTS, "RESULTS.md"} <= names
    other = sorted(n for n in names
                   if not re.fullmatch(r"bench_\w+\.py", n) and n not in (*SPEED_SCRIPTS, "RESULTS.md"))
    assert not other, f"benchmarks/ holds speed and memory checks only (science scripts go to experiments/): {other}"
    for path in BENCHMARKS.glob("bench_*.py"):
        tests = [n for n in ast.parse(path.read_text()).body
                 if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
        assert tests and all("benchmark" in [a.arg for a in t.args.args] for t in tests), path.name


def test_experiments_hold_the_science_scripts():
    """The science scripts and their RESULTS.md; no speed suite, no test (scripts run by hand, with a main)."""
    names = _entries(EXPERIMENTS)
    assert {*SCIENCE_SCRIPTS, "RESULTS.md"} <= names
    assert not set(SCIENCE_SCRIPTS) & _entries(BENCHMARKS)
    assert not [n for n in names if n.startswith("bench_") or n in SPEED_SCRIPTS]
    assert not [n for n in names if not n.endswith((".py", ".md"))], names
    for path in EXPERIMENTS.glob("*.py"):
        text = path.read_text()
        assert '__name__ == "__main__"' in text and not re.search(r"^def test_", text, re.M), path.name


@pytest.mark.parametrize("folder", ["benchmarks", "experiments"])
def test_results_open_with_what_holds_at_head(folder):
    """One page of the newest figure of each kind (each row dated), then the dated history."""
    text = (ROOT / folder / "RESULTS.md").read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[:2] == [HEAD_PAGE, HISTORY], sections[:2]
    page = text.split(HEAD_PAGE, 1)[1].split(HISTORY, 1)[0].strip().splitlines()
    assert len(page) <= HEAD_PAGE_LINES
    rows = [line for line in page if line.startswith("| ") and not line.startswith(("| figure |", "| result |"))]
    assert len(rows) >= 5
    undated = [row[:80] for row in rows if not re.search(r"\b20\d\d-\d\d-\d\d", row)]
    assert not undated, undated


def _script_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level name)`` of every absolute import of a file (inside functions too)."""
    out = []
    for node in _import_nodes(ast.parse(path.read_text(), str(path)), module_level=False):
        if isinstance(node, ast.ImportFrom) and node.level:
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        out.extend((node.lineno, n.split(".")[0]) for n in names)
    return out


def test_scripts_import_the_package_and_their_own_folder_only():
    """A script imports cellfluxrl by current paths and sibling scripts of its own folder by name;
    benchmarks never import a science script, experiments never a benchmark, and the package neither."""
    stems = {folder: {p.stem for p in folder.glob("*.py")} for folder in (BENCHMARKS, EXPERIMENTS)}
    assert stems[EXPERIMENTS] >= {Path(n).stem for n in SCIENCE_SCRIPTS}
    assert ("rl_experiment", "experiments/rl_compare.py") in {  # the walk sees sibling imports
        (name, "experiments/rl_compare.py") for _, name in _script_imports(EXPERIMENTS / "rl_compare.py")}
    bad = []
    for folder, other in ((BENCHMARKS, EXPERIMENTS), (EXPERIMENTS, BENCHMARKS)):
        for path in sorted(folder.glob("*.py")):
            where = f"{folder.name}/{path.name}"
            bad += [f"{where}:{line} imports {t}" for line, t in imported(path, f"{folder.name}.{path.stem}")
                    if t not in modules()]
            bad += [f"{where}:{line} imports {name} from {other.name}/" for line, name in _script_imports(path)
                    if name in stems[other] - stems[folder] or name in ("benchmarks", "experiments")]
    scripts = stems[BENCHMARKS] | stems[EXPERIMENTS] | {"benchmarks", "experiments"}
    bad += [f"{name}:{line} imports {top}" for name, path in modules().items()
            for line, top in _script_imports(path) if top in scripts]
    assert not bad, "\n".join(bad)


def _citing_texts():
    """``(path, text with its whitespace runs collapsed to one space)`` of every citing text."""
    for pattern in CITING:
        for path in sorted(ROOT.glob(pattern)):
            if path.is_file() and path.suffix in (".py", ".md", ".toml") and path != Path(__file__).resolve():
                yield path, " ".join(path.read_text().split())


def test_every_cited_script_path_exists():
    """After a move, no text sends a reader to a script that is not there any more."""
    bad = [f"{path.relative_to(ROOT)}: {m.group(0)}" for path, text in _citing_texts()
           for m in re.finditer(r"(?<![\w.])(benchmarks|experiments)/(\w+)\.py\b", text)
           if m.group(2) not in PLACEHOLDERS and not (ROOT / m.group(1) / f"{m.group(2)}.py").is_file()]
    assert not bad, "\n".join(bad)


def test_every_cited_results_section_exists():
    """``benchmarks/RESULTS.md, "Title"`` (or ``experiments/...``) names a heading of that file."""
    headings = {folder: [line.lstrip("#").strip().lower()
                         for line in (ROOT / folder / "RESULTS.md").read_text().splitlines() if line.startswith("#")]
                for folder in ("benchmarks", "experiments")}
    cite = re.compile(r"(?<![\w.])(benchmarks|experiments)/RESULTS\.md`?\)?,? ?\(?\"([^\"]+)\"")
    cited, bad = 0, []
    for path, text in _citing_texts():
        for m in cite.finditer(text):
            cited += 1
            if not any(m.group(2).lower() in h for h in headings[m.group(1)]):
                bad.append(f'{path.relative_to(ROOT)}: {m.group(1)}/RESULTS.md, "{m.group(2)}"')
    assert cited >= 10  # the pattern still finds the citations
    assert not bad, "sections not found:\n" + "\n".join(bad)
