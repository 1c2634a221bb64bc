"""tools.review: the pull-request markdown, on a real pruning stage in a temporary git + DVC repository."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from yoloprune.errors import YoloPruneError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tools/ sits beside the package, not installed with it
review = importlib.import_module("tools.review")
Revision, format_review, main = review.Revision, review.format_review, review.main
resolve_rev, review_markdown = review.resolve_rev, review.review_markdown

BIN = Path(sys.executable).parent

# One real, cheap stage: prune yolov8n from its yaml (seeded weights) at imgsz 64 with a 20-step schedule.
DVC_YAML = """\
stages:
  prune:
    cmd: python -m yoloprune prune yolov8n.yaml --speed-up ${speed_up} --method ${method} --imgsz 64
         --iterative-steps 20 -q -o m.pt --report metrics/prune.json
    params: [speed_up, method]
    outs: [m.pt]
    metrics:
      - metrics/prune.json: {cache: false}
"""


def sh(cmd: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def git_dvc_repo(root: Path) -> Path:
    sh("git init -q -b main && git config user.name test && git config user.email test@example.com "
       "&& dvc init -q && dvc config core.analytics false", root)
    return root


def table(markdown: str, section: str) -> dict[str, list[str]]:
    """Return the rows of the markdown table under ``### section``, keyed by their second cell (param/metric)."""
    text = markdown.split(f"### {section}", 1)[1].split("###", 1)[0]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in text.splitlines() if ln.startswith("|")]
    return {r[1]: r for r in rows[2:]}  # skip the header and the |---| rule


@pytest.mark.slow  # two `dvc repro` of a pruning stage: ~15 s of CPU, more on a busy machine
def test_review_shows_the_old_and_new_speed_up(tmp_path):
    repo = git_dvc_repo(tmp_path)
    (repo / "params.yaml").write_text("speed_up: 2\nmethod: lamp\n")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    sh("dvc repro -q && git add -A && git commit -qm baseline", repo)
    sh("git checkout -qb faster", repo)
    (repo / "params.yaml").write_text("speed_up: 3\nmethod: lamp\n")
    sh("dvc repro -q && git commit -qam 'speed_up 3'", repo)

    md = review_markdown("main", repo)
    assert md.startswith("## Pipeline changes against `main`")
    params = table(md, "Params")
    assert params["speed_up"][2:4] == ["2", "3"]
    assert "method" not in params  # unchanged params stay out
    metrics = table(md, "Metrics")
    assert float(metrics["speed_up"][2]) == pytest.approx(2.0, rel=0.05)
    assert float(metrics["speed_up"][3]) == pytest.approx(3.0, rel=0.05)
    assert float(metrics["pruned_macs"][3]) < float(metrics["pruned_macs"][2])

    # the same comparison with two committed revisions instead of the workspace
    md = review_markdown("main", repo, head="faster")
    assert "`faster`" in md.splitlines()[0]
    assert table(md, "Params")["speed_up"][2:4] == ["2", "3"]


def test_format_review_tables_and_empty_sections():
    base = Revision("main", "0123456789abcdef" * 2 + "01234567")
    params = ("| Path        | Param    | main   | workspace   |\n|-------------|----------|--------|-------------|\n"
              "| params.yaml | speed_up | 2      | 3           |")
    empty = "| Path   | Metric   | main   | workspace   | Change   |\n|--------|----------|--------|-------------|---|"
    md = format_review(base, params, empty)
    assert md.splitlines()[0] == "## Pipeline changes against `main` (0123456)"
    assert table(md, "Params")["speed_up"] == ["params.yaml", "speed_up", "2", "3"]
    assert "_No metric changed._" in md and "| Change" not in md  # a header without rows is no table
    assert format_review(base, "", "").count("changed._") == 2
    head = Revision("pr-ci", "f" * 40)
    assert format_review(base, params, "", head).splitlines()[0] == \
        "## Pipeline changes: `pr-ci` (fffffff) against `main` (0123456)"


def test_errors_outside_a_repository_and_for_an_unknown_base(tmp_path, capsys):
    with pytest.raises(YoloPruneError, match="not inside a git repository"):
        review_markdown("main", tmp_path)
    sh("git init -q", tmp_path)
    with pytest.raises(YoloPruneError, match="not inside a DVC repository"):
        review_markdown("main", tmp_path)
    sh("dvc init -q && git -c user.name=t -c user.email=t@t commit -qm init", tmp_path)
    with pytest.raises(YoloPruneError, match="revision 'nosuch' does not exist.*--base"):
        review_markdown("nosuch", tmp_path)
    assert main(["--base", "nosuch", "--repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tools.review: error: revision 'nosuch'")


def test_base_falls_back_to_the_remote_tracking_branch(tmp_path):
    sh("git init -q && git -c user.name=t -c user.email=t@t commit -q --allow-empty -m init "
       "&& git update-ref refs/remotes/origin/release HEAD", tmp_path)
    rev = resolve_rev("release", tmp_path)
    assert rev.rev == "origin/release" and len(rev.commit) == 40


def test_pr_review_workflow_reproduces_and_comments():
    wf = yaml.safe_load((REPO / ".github/workflows/pr-review.yml").read_text())
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "pull_request" in triggers
    assert wf["permissions"]["pull-requests"] == "write"
    steps = wf["jobs"]["review"]["steps"]
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0
    assert any(s.get("uses", "").startswith("actions/setup-python@") for s in steps)
    runs = "\n".join(s.get("run", "") for s in steps)
    for command in ("make setup", "dvc pull", "dvc repro", "dvc exp run", "make -s review"):
        assert command in runs, command
    assert any(s.get("uses", "").startswith("actions/github-script@") for s in steps)  # posts the comment


def run_step(name: str, tmp_path: Path, remotes: str, pull_ok: bool = True) -> tuple[subprocess.CompletedProcess, str]:
    """Run a workflow step's script as GitHub does (bash -eo pipefail) against a fake dvc and python; return the
    process and what it wrote to $GITHUB_OUTPUT."""
    steps = yaml.safe_load((REPO / ".github/workflows/pr-review.yml").read_text())["jobs"]["review"]["steps"]
    script = next(s["run"] for s in steps if s.get("name", "").startswith(name))
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (tmp_path / "remotes").write_text(remotes)
    (fake / "dvc").write_text(f'#!/bin/sh\ncase "$1" in remote) cat "{tmp_path}/remotes" ;; '
                              f'pull) exit {0 if pull_ok else 1} ;; esac\n')
    (fake / "python").write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then echo 3.67.1; else echo "$@" >> "{tmp_path}/pip"; fi\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    out = tmp_path / "github_output"
    out.write_text("")
    env = {"PATH": f"{fake}:/usr/bin:/bin", "GITHUB_OUTPUT": str(out), "DVC_REMOTE_URL": ""}
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], env=env,
                          capture_output=True, text=True, check=False)
    return proc, out.read_text()


def test_workflow_installs_the_plugin_each_remote_needs(tmp_path):
    proc, _ = run_step("Install the DVC plugin", tmp_path, "storage\ts3://bucket/cache\nmirror\tgs://b/c (default)\n")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "pip").read_text().split() == ["-m", "pip", "install", "-q", "dvc[s3,gs]==3.67.1"]
    (tmp_path / "pip").unlink()
    proc, _ = run_step("Install the DVC plugin", tmp_path, "local\t/mnt/dvc-cache\nweb\thttps://example.com/c\n")
    assert proc.returncode == 0 and not (tmp_path / "pip").exists()  # DVC's core reads those
    proc, _ = run_step("Install the DVC plugin", tmp_path, "odd\tfoo://bucket\n")
    assert proc.returncode == 1 and "::error::DVC remote foo://bucket" in proc.stdout


def test_workflow_fails_loudly_when_a_configured_remote_cannot_be_pulled(tmp_path):
    proc, mode = run_step("Pull cached outputs", tmp_path, "storage\ts3://bucket/cache\n", pull_ok=False)
    assert proc.returncode == 1 and "::error::dvc pull" in proc.stdout and mode == ""  # no fallback to small
    proc, mode = run_step("Pull cached outputs", tmp_path, "storage\ts3://bucket/cache\n")
    assert proc.returncode == 0 and mode == "mode=remote\n"
    proc, mode = run_step("Pull cached outputs", tmp_path, "")
    assert proc.returncode == 0 and mode == "mode=small\n"
