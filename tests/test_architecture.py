"""The package's shape, read from the code with `ast`: wings that import only wings below them,
stages and apps on top that nothing imports, and dvc.yaml's src/ deps derived from the imports.

DVC re-runs a stage only when one of its listed deps changes. A stage lists its own script and
the wings (folders) its code reaches through imports, followed transitively: a wing it reaches but
does not list would leave stale outputs behind after an edit, and a listed wing it no longer
reaches re-runs it for nothing. Imports are every `import` and `from ... import`, also inside
functions, relative ones too; a package's `__init__.py` counts only when it holds more than a
docstring. Imports made by name at run time (importlib) are not seen.
"""

import ast
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

PACKAGE = "agegender"
WINGS = ("contracts", "facedata", "nets", "inference", "evaluation")  # bottom to top
TOP = ("stages", "apps")  # may import any wing; nothing imports them
STAGE_MODULE = re.compile(r"python -m (agegender\.stages\.\w+)")
MAX_DEPS = 8
# Stages that run the model on a split's crops reach every wing below evaluation and read four
# data inputs (model, split, crops, landmark weights); evaluate_external, evaluate and export
# also read the age range calibration, and evaluate collates the training history and the
# external report. Pinned, so that they cannot grow unnoticed.
WIDE_STAGES = {"calibrate": 9, "evaluate_external": 9, "evaluate": 13, "export": 10}


def module_file(name, root):
    """The file of module `name` under root/src, or None when it is not one of ours."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    path = root / "src" / name.replace(".", "/")
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def with_parents(name):
    """Importing a.b.c also runs a and a.b: ["a", "a.b", "a.b.c"]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(name, root):
    """Names of the package's modules that module `name` imports anywhere in its file."""
    path = module_file(name, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import x` imports pkg, and pkg.x as well when x is a module
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
    names = {parent for imported in found for parent in with_parents(imported)}
    return {module for module in names if module_file(module, root)}


def counts(path):
    """A module matters unless it is an `__init__.py` holding at most a docstring."""
    if path.name != "__init__.py":
        return True
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


def reached_modules(module, root):
    """{name: the module that first imports it} for every module `module` runs, itself too."""
    importer = {name: "the command" for name in with_parents(module)}
    queue = list(importer)
    while queue:
        current = queue.pop(0)
        for name in sorted(imported_modules(current, root) - importer.keys()):
            importer[name] = current
            queue.append(name)
    return importer


def dep_of(path, root):
    """What dvc.yaml lists for a file of the package: a stage's own script, or its wing."""
    parts = path.relative_to(root / "src" / PACKAGE).parts
    if len(parts) > 1 and parts[0] != "stages":
        return f"src/{PACKAGE}/{parts[0]}"
    return path.relative_to(root).as_posix()


def required_deps(module, root):
    """{src/ dep of dvc.yaml: the module through which `module` reaches it}."""
    required = {}
    for name, importer in reached_modules(module, root).items():
        path = module_file(name, root)
        if counts(path):
            required.setdefault(dep_of(path, root), importer)
    return required


def dep_problems(stage_name, stage, root):
    """One message per wing or script the stage reaches but does not list, or lists but does
    not reach."""
    match = STAGE_MODULE.search(stage["cmd"])
    if match is None:
        return [f"stage '{stage_name}': no `python -m agegender.stages.<name>` in its cmd"]
    required = required_deps(match.group(1), root)
    listed = {dep for dep in stage_deps(stage) if dep.startswith("src/")}
    missing = [
        f"stage '{stage_name}' imports {path} (through {required[path]}) "
        "but dvc.yaml does not list it in deps; add it"
        for path in sorted(required.keys() - listed)
    ]
    stale = [
        f"stage '{stage_name}' lists {path} in deps but no longer imports it; remove it"
        for path in sorted(listed - required.keys())
    ]
    return missing + stale


def stage_deps(stage):
    return [dep if isinstance(dep, str) else next(iter(dep)) for dep in stage.get("deps", [])]


def part_of(name):
    """The wing, "stages", "apps" or "root" a module of the package belongs to."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS + TOP else "root"


def layering_problems(root):
    """One message per import that runs sideways into a stage or an app, or up a wing."""
    problems = []
    for path in sorted((root / "src" / PACKAGE).rglob("*.py")):
        name = ".".join(path.relative_to(root / "src").with_suffix("").parts)
        name = name.removesuffix(".__init__")
        own = part_of(name)
        for imported in sorted(imported_modules(name, root)):
            target = part_of(imported)
            if target == "root" or own == target == "apps":
                continue  # the package itself; the command dispatches to its apps
            if target in TOP and own != "root":
                problems.append(f"{name} imports {imported}: nothing imports a stage or an app")
            elif target in WINGS and own in WINGS and WINGS.index(target) > WINGS.index(own):
                problems.append(f"{name} imports {imported}: wing {own} sits below {target}")
    return problems


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage_name", sorted(STAGES))
def test_stage_lists_exactly_the_wings_it_imports(stage_name):
    problems = dep_problems(stage_name, STAGES[stage_name], REPO)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("stage_name", sorted(STAGES))
def test_stage_lists_at_most_eight_deps(stage_name):
    deps = stage_deps(STAGES[stage_name])
    most = WIDE_STAGES.get(stage_name, MAX_DEPS)
    assert len(deps) <= most, f"stage '{stage_name}' lists {len(deps)} deps: {deps}"


def test_imports_run_down_the_wings_and_never_into_a_stage_or_an_app():
    assert layering_problems(REPO) == []
    folders = {p.name for p in (REPO / "src" / PACKAGE).iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(WINGS) | set(TOP)


def test_the_package_root_is_small_and_no_two_modules_share_a_name():
    package = REPO / "src" / PACKAGE
    assert sorted(p.name for p in package.glob("*.py")) == ["__init__.py", "__main__.py"]
    names = [p.name for p in package.rglob("*.py") if p.name != "__init__.py"]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def write_package(root, files):
    for relative, text in files.items():
        path = root / "src" / PACKAGE / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_wing_missing_from_deps_and_an_upward_import_are_reported(tmp_path):
    """A stage reaching a wing through a relative import inside a function, and through another
    wing; a listed wing it does not reach is stale; a wing importing upward or an app is named."""
    write_package(
        tmp_path,
        {
            "__init__.py": '"""Only a docstring."""\n',
            "stages/__init__.py": '"""Only a docstring."""\n',
            "stages/run.py": "def main():\n    from ..nets import training\n",
            "contracts/__init__.py": "",
            "contracts/errors.py": "",
            "nets/__init__.py": "",
            "nets/training.py": "from agegender.contracts import errors\n",
            "apps/__init__.py": "",
            "apps/predict.py": "",
            "evaluation/__init__.py": "",
            "evaluation/plots.py": "",
        },
    )
    stage = {
        "cmd": "python -m agegender.stages.run",
        "deps": ["src/agegender/stages/run.py", "src/agegender/evaluation", "data/raw"],
    }

    assert dep_problems("run", stage, tmp_path) == [
        "stage 'run' imports src/agegender/contracts (through agegender.nets.training) "
        "but dvc.yaml does not list it in deps; add it",
        "stage 'run' imports src/agegender/nets (through agegender.stages.run) "
        "but dvc.yaml does not list it in deps; add it",
        "stage 'run' lists src/agegender/evaluation in deps but no longer imports it; remove it",
    ]
    stage["deps"] = [
        "src/agegender/stages/run.py",
        "src/agegender/contracts",
        "src/agegender/nets",
        "data/raw",
    ]
    assert dep_problems("run", stage, tmp_path) == []
    assert layering_problems(tmp_path) == []

    write_package(
        tmp_path,
        {
            "contracts/errors.py": "from agegender.nets import training\n",
            "nets/training.py": "from agegender.apps import predict\n",
        },
    )
    assert layering_problems(tmp_path) == [
        "agegender.contracts.errors imports agegender.nets: wing contracts sits below nets",
        "agegender.contracts.errors imports agegender.nets.training: wing contracts sits below "
        "nets",
        "agegender.nets.training imports agegender.apps: nothing imports a stage or an app",
        "agegender.nets.training imports agegender.apps.predict: nothing imports a stage or an app",
    ]


def changed_src_deps(workdir):
    """{stage: [src/ deps whose content differs from dvc.lock]} as `dvc status` sees them."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    changed = {}
    for stage, entries in yaml.safe_load(result.stdout or "{}").items():
        for entry in entries:
            if isinstance(entry, dict) and "changed deps" in entry:
                paths = [p for p in entry["changed deps"] if p.startswith("src/")]
                if paths:
                    changed[stage.split(":")[-1]] = sorted(paths)
    return changed


def test_an_app_edit_reruns_no_stage_and_a_wing_edit_exactly_its_importers(tmp_path):
    """On a copy of the tree: dvc.lock matches the code (Python's bytecode caches are ignored);
    an edit to the predict app leaves every stage clean; an edit to the nets wing changes
    exactly the stages that list it."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "src", "dvc.yaml", "dvc.lock",
         "params.yaml", ".dvc/config", ".dvcignore"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for relative in files:
        if (REPO / relative).is_file():
            (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / relative, tmp_path / relative)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    cache = tmp_path / "src" / PACKAGE / "nets" / "__pycache__"
    cache.mkdir()
    (cache / "losses.cpython-311.pyc").write_bytes(b"\0" * 16)
    assert changed_src_deps(tmp_path) == {}

    with open(tmp_path / "src" / PACKAGE / "apps" / "predict.py", "a") as app:
        app.write("\n# an edit to an app\n")
    assert changed_src_deps(tmp_path) == {}

    with open(tmp_path / "src" / PACKAGE / "nets" / "losses.py", "a") as wing:
        wing.write("\n# an edit to a wing\n")
    importers = {
        name for name, stage in STAGES.items() if "src/agegender/nets" in stage_deps(stage)
    }
    assert importers == {
        "features",
        "train",
        "calibrate",
        "evaluate_external",
        "evaluate",
        "export",
    }
    assert changed_src_deps(tmp_path) == {name: ["src/agegender/nets"] for name in importers}
