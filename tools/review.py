"""Review a pipeline variant: its params and metrics diffs against a base revision, as pull-request markdown.

``dvc params diff --md`` and ``dvc metrics diff --md`` do the comparing; this module
checks first that there is something to compare (a git + DVC repository, revisions
that exist), runs them, and puts their tables under short headings. The "after"
side is the workspace unless ``head`` names a revision, so a pipeline just
reproduced (outputs not committed) is what the reviewer sees. A revision is a
branch, tag or commit, or the name of a ``dvc exp run`` experiment.

    python -m tools.review --base main                  # or: make review BASE=main
    python -m tools.review --base base-ci --head pr-ci  # two experiments (make review BASE=base-ci REV=pr-ci)
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from yoloprune.errors import YoloPruneError

LOGGER = logging.getLogger("tools.review")


@dataclass(frozen=True)
class Revision:
    """One side of a comparison: the name dvc is given, and the commit it names."""

    rev: str  # as passed to dvc, e.g. "main", "origin/main" or an experiment's name
    commit: str  # full SHA


def dvc_command() -> list[str]:
    """Return the argv prefix that runs DVC: this interpreter's ``dvc`` module if installed, else ``dvc`` on PATH."""
    if importlib.util.find_spec("dvc") is not None:  # the venv's DVC, whatever PATH says
        return [sys.executable, "-m", "dvc"]
    found = shutil.which("dvc")
    if found is None:
        raise YoloPruneError("dvc is not installed; run `make setup` (or pip install dvc) and try again")
    return [found]


def _run(argv: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise YoloPruneError(f"{argv[0]}: not found; install it and make sure it is on PATH") from e


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def check_repo(repo: str | Path = ".") -> Path:
    """Return the root of the DVC repository at ``repo``, or raise if it is not inside a git + DVC repository."""
    repo = Path(repo)
    if not repo.is_dir():
        raise YoloPruneError(f"{repo}: no such directory; run from the project root")
    if _run(["git", "rev-parse", "--show-toplevel"], repo).returncode:
        raise YoloPruneError(f"{repo.resolve()}: not inside a git repository; diffs against a base revision need "
                             "git (clone the project, or git init && dvc init)")
    out = _run([*dvc_command(), "root"], repo)
    if out.returncode:
        raise YoloPruneError(f"{repo.resolve()}: not inside a DVC repository; run from the project root "
                             "(the folder with dvc.yaml and .dvc/)")
    return (repo / out.stdout.strip()).resolve()


def resolve_rev(rev: str, repo: str | Path = ".", option: str = "--base") -> Revision:
    """Return the revision ``rev`` (branch, tag, commit or experiment name) and its commit, or raise if unknown.

    CI checkouts often have the base branch only as a remote-tracking branch, so
    ``main`` falls back to ``origin/main`` when there is no local ``main``.
    """
    repo = Path(repo)
    candidates = [rev] if rev.startswith("origin/") else [rev, f"origin/{rev}"]
    for name in candidates:
        out = _run(["git", "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"], repo)
        if out.returncode == 0:
            if name != rev:
                LOGGER.info("no local %s: comparing with %s", rev, name)
            return Revision(name, out.stdout.strip())
    # dvc keeps experiments as refs/exps/<baseline sha split 2/38>/<name>
    refs = _run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"], repo).stdout
    commits = [line.split()[0] for line in refs.splitlines() if line.endswith(f"/{rev}")]
    if len(commits) == 1:
        return Revision(rev, commits[0])
    if len(commits) > 1:
        raise YoloPruneError(f"{len(commits)} experiments are named {rev!r}; pass the commit of the one to "
                             f"compare with {option} (dvc exp show lists them)")
    raise YoloPruneError(f"revision {rev!r} does not exist here; fetch it (git fetch origin {rev}, or "
                         f"fetch-depth: 0 in CI) or pass another one with {option}")


def dvc_diff(kind: str, revs: Sequence[str], repo: str | Path = ".", all_rows: bool = False) -> str:
    """Return ``dvc {kind} diff <revs> --md`` (kind: params or metrics) as run in ``repo``: a markdown table.

    ``revs`` is the base alone (against the workspace) or the base and the head.
    """
    if kind not in ("params", "metrics"):
        raise ValueError(f"kind must be 'params' or 'metrics', not {kind!r}")
    argv = [*dvc_command(), kind, "diff", *revs, "--md"] + (["--all"] if all_rows else [])
    out = _run(argv, Path(repo))
    if out.returncode:
        raise YoloPruneError(f"dvc {kind} diff {' '.join(revs)} failed: {_last_line(out.stderr or out.stdout)}")
    return out.stdout.strip()


def format_review(base: Revision, params_md: str, metrics_md: str, head: Revision | None = None) -> str:
    """Return the review markdown: a heading naming both sides, then the params and the metrics tables.

    A table without rows (nothing changed: dvc still prints its header) becomes a
    one-line note, so the comment always has both sections.
    """
    if head is None:
        lines = [f"## Pipeline changes against `{base.rev}` ({base.commit[:7]})", "",
                 "`workspace` is this branch with the pipeline reproduced.", ""]
    else:
        lines = [f"## Pipeline changes: `{head.rev}` ({head.commit[:7]}) against `{base.rev}` ({base.commit[:7]})", ""]
    for title, table, empty in (("Params", params_md, "No parameter changed."),
                                ("Metrics", metrics_md, "No metric changed.")):
        rows = [ln for ln in table.strip().splitlines() if ln.startswith("|")]
        lines += [f"### {title}", "", table.strip() if len(rows) > 2 else f"_{empty}_", ""]  # > header + rule
    return "\n".join(lines).rstrip() + "\n"


def review_markdown(base: str = "main", repo: str | Path = ".", head: str | None = None,
                    all_rows: bool = False) -> str:
    """Return the markdown a reviewer wants: ``dvc params diff`` and ``dvc metrics diff`` of ``head`` vs ``base``.

    ``head`` None is the workspace. ``all_rows`` also lists the params and metrics that did not change.
    """
    root = check_repo(repo)
    old = resolve_rev(base, root, "--base")
    new = resolve_rev(head, root, "--head") if head is not None else None
    revs = [old.rev] + ([new.rev] if new else [])
    return format_review(old, dvc_diff("params", revs, root, all_rows), dvc_diff("metrics", revs, root, all_rows), new)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tools.review [--base REV] [--head REV] [--all]``: print the review markdown; 2 on an error."""
    parser = argparse.ArgumentParser(prog="python -m tools.review", description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="branch, tag or commit to compare with (default main)")
    parser.add_argument("--head", default=None, help="revision to review (default: the workspace)")
    parser.add_argument("--all", action="store_true", dest="all_rows", help="also list unchanged params and metrics")
    parser.add_argument("--repo", default=".", help="a folder inside the project (default: the current one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        text = review_markdown(args.base, args.repo, args.head, args.all_rows)
    except YoloPruneError as e:
        print(f"tools.review: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
