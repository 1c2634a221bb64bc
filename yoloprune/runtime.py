"""What runs a model and on what: devices, ONNX Runtime sessions, seeded inputs, timing, versions and machine.

The lowest layer under ``export`` (its parity check) and ``benchmark`` (its timing):
it imports no other yoloprune module but ``errors``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Collection, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from yoloprune.errors import YoloPruneError


def resolve_device(device: str | int) -> torch.device:
    """Return the torch device ``device`` names ("cpu", "0", "cuda:1", "mps"), or raise if it does not exist here."""
    text = str(device).strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise YoloPruneError("device 'mps' does not exist here: torch sees no Apple GPU; use device='cpu'")
        return torch.device("mps")
    index = text.removeprefix("cuda").removeprefix(":") or "0"
    if not index.isdigit():
        raise YoloPruneError(f"device {device!r} is not a device name; use 'cpu', a CUDA index such as '0' or "
                             "'cuda:0', or 'mps' (one device: benchmarks time one)")
    if not torch.cuda.is_available():
        raise YoloPruneError(f"device {device!r} does not exist: torch {torch.__version__} sees no CUDA GPU "
                             "(torch.cuda.is_available() is False); use device='cpu'")
    count = torch.cuda.device_count()
    if int(index) >= count:
        raise YoloPruneError(f"device {device!r} does not exist: torch sees {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", int(index))


def seeded_images(batch: int, imgsz: int, seed: int = 0) -> torch.Tensor:
    """Return ``batch`` random RGB images in [0, 1], the same for the same seed (the global RNG untouched)."""
    return torch.rand(batch, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(seed))


def flat_tensors(obj: Any, skip: Collection[str] = ()) -> list[torch.Tensor]:
    """Return every tensor in a nested model output (tensors, lists, tuples, dicts), in order.

    Dict entries whose key is in ``skip`` are left out (e.g. YOLO26's ``feats``, the
    head's inputs handed back in training).
    """
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k, v in obj.items() if k not in skip for t in flat_tensors(v, skip)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in flat_tensors(v, skip)]
    return []


def ort_session(onnx_path: str | Path, threads: int, device: torch.device | None = None):
    """Return an ONNX Runtime session for ``onnx_path``: ``threads`` intra-op threads, one inter-op, all optimisations.

    Sequential execution on the CPU provider, or the CUDA one for a CUDA ``device``
    (which needs ``onnxruntime-gpu``).
    """
    import onnxruntime as ort

    device = device or torch.device("cpu")
    if device.type not in ("cpu", "cuda"):
        raise YoloPruneError(f"runtime 'onnx' runs on cpu or CUDA devices, not {device.type}; use device='cpu'")
    providers: list = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise YoloPruneError("runtime 'onnx' on a CUDA device needs onnxruntime-gpu; run: pip uninstall "
                                 "onnxruntime && pip install onnxruntime-gpu, or use device='cpu'")
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), opts, providers=providers)


def onnx_runner(onnx_path: str | Path, imgsz: int, batch: int = 1, device: torch.device | None = None,
                threads: int = 1) -> Callable[[], object]:
    """Return a call that runs the ONNX file once on a fixed seeded input (``ort_session``), as benchmarks time it."""
    session = ort_session(onnx_path, threads, device)
    inp = session.get_inputs()[0]
    dtype = np.float16 if "float16" in inp.type else np.float32  # FP16 exports keep FP32 inputs; older ones may not
    feed = {inp.name: seeded_images(batch, imgsz).numpy().astype(dtype)}
    return lambda: session.run(None, feed)


def time_calls(run: Callable[[], object], warmup: int, iters: int, device: torch.device) -> list[float]:
    """Return the wall time in ms of each of ``iters`` calls of ``run``, after ``warmup`` untimed calls."""
    return time_interleaved([run], warmup, iters, device)[0]


def time_interleaved(runs: Sequence[Callable[[], object]], warmup: int, iters: int, device: torch.device,
                     rounds: int = 5, settle: int = 2) -> list[list[float]]:
    """Return the wall times in ms of ``iters`` calls of each of ``runs``, the runs taking turns in ``rounds`` rounds
    (every other round in reverse order), after ``warmup`` untimed calls of each (``time_rounds``, flattened)."""
    return [[t for turn in per_run for t in turn] for per_run in time_rounds(runs, warmup, iters, device, rounds, settle)]


def round_best(per_round: Sequence[Sequence[float]]) -> float:
    """Return the median over rounds of each round's fastest call (ms): the figure a slow spell of a shared machine
    barely moves. Measured (the pipeline's yolov8n at 160 px against its pruned model, idle 2-core CPU, three models
    taking turns, six timings of the same pair): the medians' ratio read 0.97-1.79x, this one's 1.64-1.98x."""
    return statistics.median(min(turn) for turn in per_round if turn)


def paired_ratio(base_ms: Sequence[float], pruned_ms: Sequence[float]) -> float:
    """Return the median over rounds of base / pruned, each round's times (ms) taken together, timed in turns: a slow
    spell of the machine slows both sides of a round and cancels in its ratio (see ``Runtime.speed_up``)."""
    return statistics.median(b / p for b, p in zip(base_ms, pruned_ms, strict=True))


def time_rounds(runs: Sequence[Callable[[], object]], warmup: int, iters: int, device: torch.device,
                rounds: int = 5, settle: int = 2) -> list[list[list[float]]]:
    """Return, for each of ``runs``, the wall times in ms of its calls in each round: ``iters`` calls each, the runs
    taking turns in ``rounds`` rounds (every other round in reverse order), after ``warmup`` untimed calls of each.

    Timed one after the other, a slow spell of a shared machine lands on one model alone:
    the pipeline's 160-px pair once timed 0.95x "faster" so, and 1.73x on the re-run. Taking
    turns, it slows every model alike. Not call by call: ONNX Runtime's threads spin on after a
    run, so the next session's call competes with them (measured: yolov8n at 160 px 7.1 ms alone,
    15.2 ms alternating call by call). Each turn starts with ``settle`` untimed calls instead.
    """
    # GPU kernels run asynchronously: wait for them, or the time is that of queueing them.
    sync = {"cuda": lambda: torch.cuda.synchronize(device), "mps": lambda: torch.mps.synchronize()}.get(
        device.type, lambda: None)
    for run in runs:
        for _ in range(warmup):
            run()
    sync()
    rounds = 1 if len(runs) == 1 else max(1, min(rounds, iters))
    times: list[list[list[float]]] = [[[] for _ in range(rounds)] for _ in runs]
    order = list(range(len(runs)))
    for r in range(rounds):
        n = iters // rounds + (r < iters % rounds)  # the iters spread over the rounds
        for k in (order if r % 2 == 0 else order[::-1]):
            for _ in range(settle if len(runs) > 1 else 0):
                runs[k]()
            sync()  # the untimed calls' queued GPU work is not the first timed call's
            for _ in range(n):
                t0 = time.perf_counter()
                runs[k]()
                sync()
                times[k][r].append((time.perf_counter() - t0) * 1000)
    return times


def versions(runtime: str | None = None) -> dict[str, str]:
    """Return the versions of the libraries a pruned model depends on (and of onnxruntime for ``runtime='onnx'``)."""
    import ultralytics

    import yoloprune

    found = {"yoloprune": yoloprune.__version__, "torch": torch.__version__,
             "torch_pruning": metadata.version("torch-pruning"), "ultralytics": ultralytics.__version__}
    if runtime == "onnx":
        import onnxruntime  # its distribution may be onnxruntime-gpu: ask the module

        found["onnxruntime"] = onnxruntime.__version__
    return found


def machine_info(device: torch.device) -> dict:
    """Return the CPU model, core counts, platform (and GPU) the numbers were measured on."""
    from ultralytics.utils.torch_utils import get_cpu_info, get_gpu_info

    info = {
        "cpu": get_cpu_info(),
        "cores_logical": os.cpu_count() or 0,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    try:
        import psutil  # optional (the pipeline extra); Ultralytics depends on it anyway

        info["cores_physical"] = psutil.cpu_count(logical=False) or 0
    except ImportError:
        pass
    if hasattr(os, "sched_getaffinity"):
        info["cores_available"] = len(os.sched_getaffinity(0))  # what a container or taskset leaves this process
    if hasattr(os, "getloadavg"):
        info["load_avg_1m"] = os.getloadavg()[0]  # other work on the machine while measuring skews timings
    if device.type == "cuda":
        info["gpu"] = get_gpu_info(device.index or 0)
    return info
