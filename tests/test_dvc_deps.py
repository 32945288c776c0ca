"""dvc.yaml's src/ deps match what each stage's code imports, so they cannot drift.

DVC re-runs a stage only when one of its listed deps changes. Editing any module must re-run
exactly the stages that import it: a module a stage imports but does not list leaves stale
outputs behind after an edit, and a listed module it no longer imports re-runs it for nothing.

The imports are read from the code with `ast` (every `import` and `from ... import`, also inside
functions, relative ones too), followed transitively through the modules of the package. A
package's `__init__.py` counts only when it holds more than a docstring. Imports made by name at
run time (importlib) are not seen.
"""

import ast
import re

import pytest
import yaml
from conftest import REPO

PACKAGE = "agegender"
STAGE_MODULE = re.compile(r"python -m (agegender\.stages\.\w+)")


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
    """A module is a dep unless it is an `__init__.py` holding at most a docstring."""
    if path.name != "__init__.py":
        return True
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


def required_deps(module, root):
    """{dep path relative to root: name of the module that first imports it} for `module`."""
    importer = {name: "the command" for name in with_parents(module)}
    queue = list(importer)
    while queue:
        current = queue.pop(0)
        for name in sorted(imported_modules(current, root) - importer.keys()):
            importer[name] = current
            queue.append(name)
    files = {name: module_file(name, root) for name in importer}
    return {
        path.relative_to(root).as_posix(): importer[name]
        for name, path in files.items()
        if counts(path)
    }


def dep_problems(stage_name, stage, root):
    """One message per module the stage imports but does not list, or lists but does not use."""
    match = STAGE_MODULE.search(stage["cmd"])
    if match is None:
        return [f"stage '{stage_name}': no `python -m agegender.stages.<name>` in its cmd"]
    required = required_deps(match.group(1), root)
    deps = [dep if isinstance(dep, str) else next(iter(dep)) for dep in stage.get("deps", [])]
    listed = {dep for dep in deps if dep.startswith("src/")}
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


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage_name", sorted(STAGES))
def test_stage_lists_exactly_the_modules_it_imports(stage_name):
    problems = dep_problems(stage_name, STAGES[stage_name], REPO)
    assert not problems, "\n".join(problems)


def test_a_module_missing_from_deps_is_reported(tmp_path):
    """A stage importing a helper through a relative import inside a function, and a package
    `__init__.py` with code: both are required, and a listed module it does not use is stale."""
    package = tmp_path / "src" / PACKAGE
    (package / "stages").mkdir(parents=True)
    (package / "__init__.py").write_text('"""Only a docstring."""\n')
    (package / "stages" / "__init__.py").write_text("STAGES = []\n")
    (package / "helper.py").write_text("VALUE = 1\n")
    (package / "unused.py").write_text("")
    (package / "stages" / "run.py").write_text("def main():\n    from .. import helper\n")
    stage = {
        "cmd": "python -m agegender.stages.run",
        "deps": ["src/agegender/stages/run.py", "src/agegender/unused.py", "data/raw"],
    }

    problems = dep_problems("run", stage, tmp_path)

    assert problems == [
        "stage 'run' imports src/agegender/helper.py (through agegender.stages.run) "
        "but dvc.yaml does not list it in deps; add it",
        "stage 'run' imports src/agegender/stages/__init__.py (through the command) "
        "but dvc.yaml does not list it in deps; add it",
        "stage 'run' lists src/agegender/unused.py in deps but no longer imports it; remove it",
    ]
    stage["deps"] = [
        "src/agegender/stages/run.py",
        "src/agegender/helper.py",
        "src/agegender/stages/__init__.py",
        "data/raw",
    ]
    assert dep_problems("run", stage, tmp_path) == []
