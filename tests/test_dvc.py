"""dvc.yaml tells the truth: each stage depends on exactly the code it runs and on the user's own files, the
metrics page renders offline. No stage runs here (no training): about 10 s in all.

The code deps need no DVC either: dvc.yaml is parsed as YAML, its ``${...}`` resolved from params.yaml, and each
stage's imports derived from its script with ``ast`` (transitively over yoloprune/, lazy imports inside functions
included: they run too). A stage that misses a module it runs is called up to date with a stale result; one that
lists a module it never runs re-runs for nothing. The user-file and plots tests call DVC's Python API on a copy.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "yoloprune"


def module_file(root: Path, name: str) -> Path | None:
    """Return the file of module ``name`` under ``root`` (a module or a package's __init__), None if not ours."""
    if name.split(".")[0] != PACKAGE:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(node: ast.AST):
    """Yield every import statement that runs, skipping `if TYPE_CHECKING:` bodies (they never do)."""
    children = node.orelse if isinstance(node, ast.If) and _is_type_checking(node) else ast.iter_child_nodes(node)
    for child in children:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        else:
            yield from _statements(child)


def direct_imports(root: Path, path: Path) -> set[Path]:
    """Return the package files ``path`` imports: each module, the modules named in `from pkg import mod`, and
    the __init__ of every package on the way (importing yoloprune.a.b runs yoloprune/__init__.py first)."""
    rel = path.relative_to(root).with_suffix("")
    here = list(rel.parts[:-1])  # the package a relative import starts from (the same for an __init__)
    names: set[str] = set()
    for node in _statements(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
            continue
        base = here[: len(here) - node.level + 1] if node.level else []
        module = ".".join([*base, *(node.module.split(".") if node.module else [])])
        names.add(module)
        names.update(f"{module}.{a.name}" for a in node.names)  # kept only where it is a module
    files = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            file = module_file(root, ".".join(parts[:i]))
            if file is not None:
                files.add(file)
    return files


def code_deps(root: Path, script: Path) -> set[str]:
    """Return the package files ``script`` runs, transitively, as repo-relative posix paths."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for file in direct_imports(root, todo.pop()) - seen:
            seen.add(file)
            todo.append(file)
    return {p.relative_to(root).as_posix() for p in seen}


def resolve(value, params: dict):
    """Return ``value`` with each ``${a.b}`` replaced from params.yaml, as DVC's templating does."""
    if isinstance(value, str):
        def lookup(m: re.Match) -> str:
            node = params
            for key in m.group(1).strip().split("."):
                node = node[key]
            return str(node)
        return re.sub(r"\$\{([^}]+)\}", lookup, value)
    if isinstance(value, list):
        return [resolve(v, params) for v in value]
    if isinstance(value, dict):
        return {resolve(k, params): resolve(v, params) for k, v in value.items()}
    return value


def stages(root: Path = REPO) -> dict[str, dict]:
    params = yaml.safe_load((root / "params.yaml").read_text())
    return resolve(yaml.safe_load((root / "dvc.yaml").read_text())["stages"], params)


def dep_paths(stage: dict) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for d in stage.get("deps", [])]


def script_of(stage: dict) -> str:
    found = re.findall(r"\bstages/\w+\.py\b", stage["cmd"])
    assert len(found) == 1, f"one stage script per command, got {stage['cmd']!r}"
    return found[0]


@pytest.mark.parametrize("name", list(stages()))
def test_stage_deps_are_exactly_the_code_it_runs(name):
    stage = stages()[name]
    script = script_of(stage)
    deps = dep_paths(stage)
    assert script in deps, f"{name}: its script {script} is not a dependency"
    declared = {d for d in deps if d.split("/")[0] == PACKAGE}
    runs = code_deps(REPO, REPO / script)
    missing, extra = sorted(runs - declared), sorted(declared - runs)
    assert not missing and not extra, (f"dvc.yaml stage '{name}': add {missing} to its deps (it runs them), "
                                       f"remove {extra} (it never imports them)")


def declared(stage: dict) -> set[str]:
    """Return every path a stage declares: deps, outs, metrics and plots."""
    kinds = ("deps", "outs", "metrics", "plots")
    return {next(iter(e)) if isinstance(e, dict) else e for k in kinds for e in stage.get(k, [])}


@pytest.mark.parametrize("name", list(stages()))
def test_stage_declares_the_files_its_script_names(name):
    stage = stages()[name]
    tree = ast.parse((REPO / script_of(stage)).read_text())
    named = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and re.fullmatch(r"(models|data|metrics|logs)/[\w./-]+", n.value)}
    assert named, f"{name}: its script names no file under models/, data/, metrics/ or logs/"
    undeclared = sorted(p for p in named if not any(p == d or p.startswith(f"{d}/") for d in declared(stage)))
    assert not undeclared, f"dvc.yaml stage '{name}': declare {undeclared} (its script reads or writes them)"


def test_import_walk_follows_lazy_relative_and_package_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": f"from {PACKAGE} import offline\n",
        "offline.py": "import os\n",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from yoloprune import unused\n"
                "def f():\n    from .sub.b import g\n",
        "unused.py": "",
        "lone.py": "",
        "sub/__init__.py": "",
        "sub/b.py": "from .. import c\n",
        "c.py": "import yoloprune.sub\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    (tmp_path / "stage.py").write_text("from yoloprune.a import f\n")
    got = code_deps(tmp_path, tmp_path / "stage.py")
    want = {f"{PACKAGE}/{p}" for p in ("__init__.py", "offline.py", "a.py", "sub/__init__.py", "sub/b.py", "c.py")}
    assert got == want  # not unused.py (type checking only) nor lone.py (never imported)


# --- the user's own files are dependencies -------------------------------------------------------------------------

def needs_dvc() -> None:
    pytest.importorskip("dvc", reason="DVC is the pipeline extra: pip install -e '.[pipeline]' (make test has it)")


def stale(repo: Path) -> set[str]:
    """Return the stages `dvc status` reports."""
    from dvc.repo import Repo

    with Repo(repo) as r:
        return set(r.status())


def commit(repo: Path) -> None:
    """Record the workspace in dvc.lock, as `dvc commit --force` does."""
    from dvc.repo import Repo

    with Repo(repo) as r:
        r.commit(force=True)


@pytest.fixture
def user_pipeline(tmp_path, monkeypatch) -> tuple[Path, Path, Path]:
    """A copy of the pipeline pointed at the user's own model and data, every output faked and recorded in dvc.lock
    by `dvc commit` (nothing is trained): DVC then judges only whether the declared inputs changed."""
    needs_dvc()
    repo, user = tmp_path / "repo", tmp_path / "user"
    repo.mkdir()
    for rel in ("dvc.yaml", "params.yaml", "stages", "yoloprune", "configs"):
        if (REPO / rel).is_dir():
            shutil.copytree(REPO / rel, repo / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / rel, repo / rel)
    (user / "images").mkdir(parents=True)
    model, data = user / "best.pt", user / "data.yaml"
    model.write_bytes(b"weights v1")
    data.write_text("path: .\ntrain: images\nval: images\nnames: {0: thing}\n")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.update(model=str(model), data=str(data))  # what `dvc exp run -S model=... -S data=...` writes
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in stages(repo).values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                out = repo / (next(iter(entry)) if isinstance(entry, dict) else entry)
                out.parent.mkdir(parents=True, exist_ok=True)
                if out.suffix:
                    out.write_text("{}\n")
                else:  # a folder (the synthetic dataset)
                    out.mkdir(exist_ok=True)
                    (out / "UNUSED").write_text("\n")
    from dvc.repo import Repo

    monkeypatch.chdir(repo)  # DVC's API resolves a stage's folder from the working directory
    Repo.init(repo, no_scm=True).close()
    commit(repo)
    assert stale(repo) == set()
    return repo, model, data


def test_user_files_are_dependencies(user_pipeline):
    repo, model, data = user_pipeline
    model.write_bytes(b"weights v2")  # retrained in place: the same path, new bytes
    assert stale(repo) == {"baseline"}  # the one stage that reads it; the rest follow once it re-ran
    commit(repo)
    data.write_text(data.read_text() + "names: {0: thing, 1: other}\n")
    readers = {name for name, stage in stages(repo).items() if "data_yaml(" in (repo / script_of(stage)).read_text()}
    assert "baseline" in readers and stale(repo) == readers  # every stage whose script reads the data.yaml


# --- offline plots ---------------------------------------------------------------------------------------------------


def test_plots_render_offline_and_tell_baseline_from_pruned(tmp_path, monkeypatch):
    """`dvc plots show` on the committed metrics writes a page that loads no script from the network (the libraries
    are inlined by .dvc/plots/offline.html) and whose trade-off scatter shapes each point by its model."""
    needs_dvc()
    from dvc.cli import main
    from dvc.repo import Repo

    repo = tmp_path / "repo"
    repo.mkdir()
    Repo.init(repo, no_scm=True).close()
    for rel in ("dvc.yaml", "params.yaml", ".dvc/config"):
        shutil.copy2(REPO / rel, repo / rel)
    for rel in ("metrics", ".dvc/plots"):
        shutil.copytree(REPO / rel, repo / rel)
    monkeypatch.chdir(repo)
    assert main(["plots", "show", "-o", "out"]) == 0
    html = (repo / "out/index.html").read_text()
    assert not re.findall(r"<script[^>]*\bsrc\s*=", html), "a script loaded from a file or URL: blank offline"
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)
    for lib in ("vega 5.", "vega-lite 5.", "vega-embed 6."):  # the inlined libraries' banners
        assert f"/* {lib}" in html
    specs = [json.loads(s) for s in re.findall(r"var spec = (\{.*?\});\s*vegaEmbed", html, flags=re.DOTALL)]
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    declared_plots = len(dvc_yaml["plots"]) + sum(len(s.get("plots", [])) for s in dvc_yaml["stages"].values())
    assert len(specs) == declared_plots
    scatter = next(s for s in specs if s["encoding"].get("shape", {}).get("field") == "model")
    assert {v["model"] for v in scatter["data"]["values"]} == {"baseline", "finetuned"}
