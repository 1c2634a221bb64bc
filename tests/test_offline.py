"""Ultralytics stays offline: a convert + prune run makes no network attempt; importing yoloprune sets nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

GUARD = textwrap.dedent("""
    import socket
    attempts = []
    def refuse(name):
        def f(*a, **k):
            attempts.append((name, a[:2]))
            raise OSError(f"network disabled in test: {name}")
        return f
    socket.getaddrinfo = refuse("getaddrinfo")
    socket.create_connection = refuse("create_connection")
    socket.socket.connect = refuse("connect")
    socket.socket.connect_ex = refuse("connect_ex")
""")

RUN = textwrap.dedent("""
    import tempfile, pathlib
    from yoloprune.cli import main
    out = pathlib.Path(tempfile.mkdtemp()) / "p.pt"
    assert main(["convert", "yolo11n.yaml", "-o", str(out.with_name("c.pt"))]) == 0
    assert main(["prune", "yolo11n.yaml", "--speed-up", "1.5", "--imgsz", "320", "--iterative-steps", "10", "-o", str(out), "-q"]) == 0
    from ultralytics import YOLO
    YOLO(str(out)).predict(__import__("numpy").zeros((64, 64, 3), "uint8"), imgsz=64, verbose=False)
    print("ATTEMPTS", attempts)
""")


def test_convert_prune_predict_make_no_network_attempt(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    out = subprocess.run([sys.executable, "-c", GUARD + RUN], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ATTEMPTS []" in out.stdout, out.stdout[-2000:]


def test_importing_the_library_changes_no_environment_and_needs_no_pipeline_packages():
    code = ("import os, sys, yoloprune, yoloprune.prune, yoloprune.benchmark, yoloprune.export\n"
            "print(sorted(k for k in os.environ if k.startswith('YOLO_')), "
            "sorted(m for m in ('dvc', 'matplotlib', 'psutil') if m in sys.modules))")
    # The user's own YOLO_OFFLINE keeps Ultralytics' import-time probe off the network; nothing else may appear.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}, "YOLO_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "['YOLO_OFFLINE'] []"
