"""Predict a network's latency on its deployment runtime from its layer widths (a HALP-style lookup table).

Every convolution the deployed network runs is timed alone on the runtime (ONNX Runtime
on CPU by default, PyTorch on CPU or CUDA) at its own input size, kernel and stride,
over a grid of input/output channel counts: 1/4, 1/2, 3/4 and all of its channels, in
multiples of the runtime's channel block. CPU vector kernels pack channels in blocks (16
with AVX-512, 8 otherwise): measured on ONNX Runtime at 80x80 px with AVX-512, a 3x3 conv
to 56 channels takes as long as one to 64, and one to 40 as long as one to 48. A layer's
time at any width is therefore the grid at the width rounded up to the block
(interpolated bilinearly), times a measured factor where the width is not a multiple of 4
(the runtime leaves its packed layout: 1.4-2x slower).

On ONNX Runtime, the table holds each convolution's kernel time as its profiler reports
it, and the whole network is profiled once at full width: each of its convolutions is
matched to its graph node, so a layer's table is scaled to the time it takes inside the
network (caches, packed layouts: 0.4-1x of the lone conv's time at 640 px); the
activations, concatenations, splits, additions, upsampling, pooling and layout reorders
(``MOVING_OPS``) scale with the feature maps' volume; the rest (the head's decoding,
attention products, the gaps between nodes) is a fixed cost. PyTorch runtimes have no
such profile: their fixed cost is the whole network's time minus the layers' sum.

That split is taken once, at one moment, and its fixed rest carries the moment's noise
and the gaps between nodes. Where pruning calls for it, the table is calibrated on the
runtime: two copies of the network with every prunable layer narrowed alike (to 3/4 and
1/2 of its channels) are timed against it, and the fixed part is the one at which the
table's predicted speed-ups match theirs (``LatencyModel.calibrate``).

The table is cached on disk (``~/.cache/yoloprune/latency/<key>.json`` by default, or
``cache_dir``), keyed by the runtime and its versions, the CPU (or GPU) model, the thread
count, the image size and every layer's shape, so a second build measures nothing.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from yoloprune.errors import YoloPruneError, check_imgsz
from yoloprune.runtime import paired_ratio, time_calls, time_rounds
from yoloprune.threads import torch_threads_kept

LOGGER = logging.getLogger("yoloprune")

GRID = (0.25, 0.5, 0.75, 1.0)  # share of a layer's channels timed per dimension: max_layer_ratio 0.75 reaches 1/4
# ONNX Runtime ops whose cost follows the feature maps' volume: activations (SiLU is fused to QuickGelu), joins,
# resampling and the reorders into and out of the packed channel layout
MOVING_OPS = ("QuickGelu", "Sigmoid", "Mul", "Concat", "Split", "Add", "Upsample", "Resize", "MaxPool", "Slice",
              "ReorderInput", "ReorderOutput")
ODD = 4  # widths not a multiple of this leave the packed layout (measured 1.4-2x slower)
CACHE_VERSION = 6  # bump when the table's layout or measuring changes, so old caches are not read (4, 5: timed
# without thread spinning, a reverted experiment: docs/results.md)


class OtherLoad:
    """The share of the machine's CPU time that other processes used while the ``with`` block ran (Linux; else 0).

    Timings taken while another process computes are not this network's: measured with a
    training job on the other core of 2, a yolov8n at 160 px pruned to 7.6x fewer MACs timed
    under 2x faster than the unpruned one, and 6.7x on a quiet machine.
    """

    share: float = 0.0

    def __enter__(self) -> OtherLoad:
        self._start = (_cpu_busy(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy, mine, wall = _cpu_busy(), time.process_time(), time.perf_counter()
        if busy is None or self._start[0] is None or wall <= self._start[2]:
            return
        others = (busy - self._start[0]) - (mine - self._start[1])
        self.share = max(0.0, others / ((wall - self._start[2]) * (os.cpu_count() or 1)))


def _cpu_busy() -> float | None:
    """Return the seconds all CPUs have spent busy since boot (``/proc/stat``), or None where it cannot be read."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


BUSY = 0.15  # other processes' share of the CPU above which a timing is not trusted


def channel_block(device: str = "cpu") -> int:
    """Return the channels a runtime's kernels process together: 16 on AVX-512 CPUs, else 8 (AVX2, GPU tensor cores)."""
    if device == "cpu" and "AVX512" in torch.backends.cpu.get_cpu_capability():
        return 16
    return 8


@dataclass(frozen=True)
class LatencyConfig:
    """Where and how the latency model measures."""

    runtime: str = "onnxruntime"  # onnxruntime (CPU) | torch (CPU) | cuda (PyTorch on the first GPU)
    threads: int = 2  # intra-op threads of the runtime, as the deployment will use
    imgsz: int = 640  # square input size; batch 1
    reps: int = 7  # timed runs per table point (the minimum is kept: other processes only ever add time)
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/yoloprune/latency (~/.cache/yoloprune/latency)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise YoloPruneError(f"unknown runtime '{self.runtime}': choose one of {', '.join(RUNTIMES)}")
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
            raise YoloPruneError(f"threads must be a positive integer, got {self.threads!r}")
        if not isinstance(self.reps, int) or self.reps < 1:
            raise YoloPruneError(f"reps must be a positive integer, got {self.reps!r}")
        check_imgsz(self.imgsz)

    def cache_path(self) -> Path:
        """Return the folder the tables are cached in."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "yoloprune" / "latency"


@dataclass(frozen=True)
class ConvSpec:
    """One convolution as the runtime sees it: full widths, kernel, stride, input size, activation."""

    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    height: int  # input spatial size
    width: int
    act: bool  # followed by SiLU (Ultralytics' Conv block): its element-wise cost scales with the width too
    cin_fixed: bool  # the image: never pruned
    cout_fixed: bool  # an output layer: never pruned

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.cin == self.cout

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def grids(self, block: int) -> tuple[list[int], list[int]]:
        """Return the input and output widths timed for this layer, multiples of ``block`` and the full widths."""
        if self.depthwise:
            g = _grid(self.cout, self.cout_fixed, block)
            return g, g
        if self.groups > 1:  # grouped, not depthwise: rare in YOLO; timed at full width, scaled with MACs
            return [self.cin], [self.cout]
        return _grid(self.cin, self.cin_fixed, block), _grid(self.cout, self.cout_fixed, block)


def _grid(full: int, fixed: bool, block: int) -> list[int]:
    if fixed or full <= block:
        return [full]
    return sorted({max(block, round(full * r / block) * block) for r in GRID} | {full})


def _misaligned(grid: list[int]) -> int | None:
    """Return a width just below the top of ``grid`` that is not a multiple of ODD (None for a fixed dimension)."""
    if len(grid) < 2:
        return None
    return grid[-1] - 1 if (grid[-1] - 1) % ODD else grid[-1] - 3


# --- runtimes ---------------------------------------------------------------------------------------------------

@dataclass
class NetProfile:
    """One network's measured time split the way the latency model composes it (ms)."""

    wall_ms: float  # the fastest whole run
    conv_ms: dict[str, float]  # each convolution's kernel time inside the network, by module name
    moving_ms: float = 0.0  # ops whose cost follows the feature maps' volume (MOVING_OPS)
    fixed_ms: float = 0.0  # everything else, including the gaps between nodes


class Runtime:
    """Times single convolutions and whole networks on one backend; a subclass per backend, registered by name."""

    name = ""
    device = "cpu"

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.block = channel_block(self.device)

    def identity(self) -> dict:
        """Return what a timing depends on besides the network: the machine and the libraries."""
        from ultralytics.utils.torch_utils import get_cpu_info  # the CPU name runtime.machine_info reports too

        return {"runtime": self.name, "cpu": get_cpu_info(), "torch": torch.__version__, "threads": self.threads,
                "block": self.block}

    def time_conv(self, spec: ConvSpec, cin: int, cout: int, reps: int) -> float:
        """Return the time in ms of ``spec`` at ``cin`` -> ``cout`` channels (minimum over ``reps`` runs)."""
        raise NotImplementedError

    def time_model(self, model: nn.Module, imgsz: int, reps: int) -> float:
        """Return the time in ms of one batch-1 inference of ``model`` (minimum over ``reps`` runs)."""
        return _best(self.runner(model, imgsz), reps, self.torch_device)

    def profile_model(self, model: nn.Module, imgsz: int, reps: int) -> NetProfile:
        """Return the whole network's time, split into its convolutions, volume-bound ops and the rest."""
        raise NotImplementedError

    def runner(self, model: nn.Module, imgsz: int) -> Callable[[], object]:
        """Return a call that runs one batch-1 inference of ``model`` at ``imgsz`` on this runtime."""
        raise NotImplementedError

    def speed_up(self, base: nn.Module, pruned: nn.Module, imgsz: int, rounds: int = 9,
                 runs: Sequence[Callable[[], object]] | None = None) -> float:
        """Return the measured speed-up of ``pruned`` over ``base``: the median over rounds of each round's ratio of
        the two networks' fastest runs.

        The two are timed interleaved, in ``rounds`` rounds, every other one in reverse
        order, so both see the same states of the machine, and each round is compared within
        itself: a slow spell of a shared machine (the unpruned yolov8n's fastest run at 160 px
        read 4.4-6.8 ms in twelve timings minutes apart) slows both sides of a round and
        cancels in its ratio. Measured (``benchmarks/speedup_estimators.py``: yolov8n and
        yolo11n pruned to 2.8x fewer MACs, 8-12 timings of the same pair, 160 and 640 px, four
        runs): sd 5.7 % on average against 6.8 % for the ratio of the two fastest runs overall,
        the figure before, steadier in 6 of 8 cases; and at the level of the benchmark stage's
        figure (its medians' ratio), where the fastest runs' ratio read 4-12 % higher: a small
        network meets a fast moment of the machine more often than a big one, which a user's
        typical call does not, and checks timed so accepted networks the benchmark then timed
        slower (the pipeline's yolov8n: checked 2.25x, benchmarked 2.11x).
        ``runs``: the two networks' ``runner`` calls, built already (timed again, not exported again).
        """
        base_ms, pruned_ms = self.paired_times(base, pruned, imgsz, rounds, runs=runs)
        return paired_ratio(base_ms, pruned_ms)

    def paired_times(self, base: nn.Module, pruned: nn.Module, imgsz: int, rounds: int = 9,
                     reps: int | None = None, runs: Sequence[Callable[[], object]] | None = None,
                     ) -> tuple[list[float], list[float]]:
        """Return per-round fastest times (ms) of ``base`` and ``pruned``, timed interleaved.

        ``reps`` runs per model and round; None: enough for about 0.1 s per model and round
        (5 runs of a 20 ms network, 25 of a 4 ms one), so a short network is not all noise.
        """
        runs = list(runs) if runs is not None else [self.runner(m, imgsz) for m in (base, pruned)]
        if reps is None:
            reps = max(5, min(50, math.ceil(100 / max(_best(runs[1], 3, self.torch_device), 1e-3))))
        # each turn: two untimed calls (kernel choice, allocation; another session's spinning threads), reps timed
        base_ms, pruned_ms = ([min(turn) for turn in per_run]
                              for per_run in time_rounds(runs, 0, rounds * reps, self.torch_device, rounds, settle=2))
        return base_ms, pruned_ms

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


RUNTIMES: dict[str, type[Runtime]] = {}


def register(name: str) -> Callable[[type[Runtime]], type[Runtime]]:
    """Register a Runtime subclass under ``name``."""

    def wrap(cls: type[Runtime]) -> type[Runtime]:
        cls.name = name
        RUNTIMES[name] = cls
        return cls

    return wrap


def get_runtime(name: str, threads: int) -> Runtime:
    """Return the runtime called ``name``, checked usable on this machine, or raise naming the fix."""
    if name not in RUNTIMES:
        raise YoloPruneError(f"unknown runtime '{name}': choose one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name](threads)


CPU = torch.device("cpu")


def _best(run: Callable[[], object], reps: int, device: torch.device = CPU) -> float:
    """Return the fastest of ``reps`` timed calls of ``run`` in ms, after two warm-up calls (kernel choice, allocation)."""
    return min(time_calls(run, 2, reps, device))


@register("onnxruntime")
class OnnxRuntime(Runtime):
    """ONNX Runtime's CPU provider: ``threads`` intra-op threads, sequential, every graph optimisation."""

    def __init__(self, threads: int) -> None:
        super().__init__(threads)
        try:
            import onnx  # noqa: F401
            import onnxruntime
        except ImportError:
            raise YoloPruneError("runtime 'onnxruntime' needs onnx and onnxruntime, which are not installed; run: "
                                 "pip install onnx onnxruntime, or set prune.runtime: torch") from None
        self.ort = onnxruntime

    def identity(self) -> dict:
        return {**super().identity(), "onnxruntime": self.ort.__version__}

    def session(self, model_bytes: bytes, profile: str | None = None):
        """Return an inference session for a serialised ONNX model, as the benchmark configures one."""
        opts = self.ort.SessionOptions()
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # Denormal floats take a slow path on x86 (measured: a random-init yolov8n at 160 px ran 22 ms instead of 4);
        # flushed to zero, timings depend on the widths, not on the weights' values.
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        return self.ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])

    def node_times(self, model_bytes: bytes, shape: tuple[int, ...], reps: int) -> tuple[dict[str, float],
                                                                                            dict[str, str]]:
        """Return each node's fastest kernel time (ms) over ``reps`` profiled runs, and the nodes' ops.

        Node times last microseconds to milliseconds and are timed on the same footing in
        the table and in the network; a whole run of a 640-px network is long enough to be
        interrupted by other processes (measured with 8 busy processes on 2 cores: fastest
        of 12 runs 160 ms, sum of its nodes' fastest 69 ms).
        """
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            session = self.session(model_bytes, profile=str(Path(tmp) / "profile"))
            x = {session.get_inputs()[0].name: np.random.default_rng(0).random(shape, dtype=np.float32)}
            for _ in range(reps + 2):
                session.run(None, x)
            events = json.loads(Path(session.end_profiling()).read_text())
        runs: dict[str, list[float]] = {}
        ops: dict[str, str] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                name = e["name"][:-len("_kernel_time")]
                runs.setdefault(name, []).append(e["dur"] / 1000)
                ops[name] = e.get("args", {}).get("op_name", "")
        best = {k: min(v[2:] or v) for k, v in runs.items()}  # the first two runs are warm-up
        return best, ops

    def runner(self, model: nn.Module | bytes, imgsz: int) -> Callable[[], object]:
        """Return a call running ``model`` (a module, or its ONNX bytes) in a session without the profiler."""
        session = self.session(model if isinstance(model, bytes) else model_onnx(model, imgsz))
        x = {session.get_inputs()[0].name: np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)}
        return lambda: session.run(None, x)

    def time_conv(self, spec: ConvSpec, cin: int, cout: int, reps: int) -> float:
        """Return the convolution kernel's own time, as the profiler reports it inside a network (no reorders)."""
        best, ops = self.node_times(conv_onnx(spec, cin, cout), (1, cin, spec.height, spec.width), reps)
        return sum(t for k, t in best.items() if ops[k] == "Conv")

    def profile_model(self, model: nn.Module, imgsz: int, reps: int) -> NetProfile:
        onnx_bytes, names = model_onnx_named(model, imgsz)
        best, ops = self.node_times(onnx_bytes, (1, 3, imgsz, imgsz), reps)
        wall = _best(self.runner(onnx_bytes, imgsz), reps)  # the profiler adds time to every node: timed without it
        conv_ms: dict[str, float] = {}
        for node, module in names.items():  # a conv's node keeps its name, or is renamed after its output
            t = best.pop(node, 0.0) + best.pop(f"{node}_nchwc", 0.0)
            if t:
                conv_ms[module] = conv_ms.get(module, 0.0) + t
        moving = sum(t for k, t in best.items() if ops[k] in MOVING_OPS)
        rest = sum(t for k, t in best.items() if ops[k] not in MOVING_OPS)
        nodes = sum(conv_ms.values()) + moving + rest
        return NetProfile(wall, conv_ms, moving, rest + max(wall - nodes, 0.0))


@register("torch")
class TorchRuntime(Runtime):
    """PyTorch eager on the CPU with ``threads`` threads (set for the timing only, then restored)."""

    def time_conv(self, spec: ConvSpec, cin: int, cout: int, reps: int) -> float:
        groups = cin if spec.depthwise else spec.groups
        conv = nn.Conv2d(cin, cout, spec.kernel, spec.stride, spec.padding, spec.dilation, groups)
        layer = nn.Sequential(conv, nn.SiLU()) if spec.act else conv
        return self._time(layer, torch.rand(1, cin, spec.height, spec.width), reps)

    def profile_model(self, model: nn.Module, imgsz: int, reps: int) -> NetProfile:
        return NetProfile(self._time(copy.deepcopy(model), torch.rand(1, 3, imgsz, imgsz), reps), {})

    def _time(self, layer: nn.Module, x: torch.Tensor, reps: int) -> float:
        layer, x = layer.to(self.torch_device).eval(), x.to(self.torch_device)
        with torch_threads_kept(self.threads), torch.inference_mode():
            return _best(lambda: layer(x), reps, self.torch_device)

    def runner(self, model: nn.Module, imgsz: int) -> Callable[[], object]:
        model = copy.deepcopy(model).float().to(self.torch_device).eval()
        x = torch.rand(1, 3, imgsz, imgsz, device=self.torch_device)

        def run() -> object:
            with torch_threads_kept(self.threads), torch.inference_mode():
                return model(x)

        return run


@register("cuda")
class CudaRuntime(TorchRuntime):
    """PyTorch eager on the first CUDA GPU (fp32)."""

    device = "cuda"

    def __init__(self, threads: int) -> None:
        if not torch.cuda.is_available():
            raise YoloPruneError("runtime 'cuda' needs a CUDA GPU, and torch sees none; set prune.runtime: "
                                 "onnxruntime (CPU) or torch, or run on a machine with a GPU")
        super().__init__(threads)

    def identity(self) -> dict:
        return {**super().identity(), "gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}


def conv_onnx(spec: ConvSpec, cin: int, cout: int) -> bytes:
    """Return a serialised ONNX graph of one convolution (+ SiLU) at these widths, random weights."""
    from onnx import TensorProto, helper, numpy_helper

    groups = cin if spec.depthwise else spec.groups
    rng = np.random.default_rng(0)
    w = rng.standard_normal((cout, cin // groups, *spec.kernel), dtype=np.float32) * 0.1
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(cout, np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if spec.act else "y"], kernel_shape=list(spec.kernel),
                              strides=list(spec.stride), pads=[*spec.padding, *spec.padding],
                              dilations=list(spec.dilation), group=groups)]
    if spec.act:
        nodes += [helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, cin, spec.height, spec.width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # readable by every ONNX Runtime since 1.15
    return model.SerializeToString()


def model_onnx(model: nn.Module, imgsz: int) -> bytes:
    """Return ``model`` exported to ONNX in memory (eval mode, batch 1, opset 17), as inference runs it."""
    import warnings

    model = copy.deepcopy(model).float().cpu().eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, imgsz, imgsz), buf, opset_version=17, dynamo=False)
    return buf.getvalue()


def model_onnx_named(model: nn.Module, imgsz: int) -> tuple[bytes, dict[str, str]]:
    """Return ``model`` in ONNX (as ``model_onnx``) and the name of the module behind each Conv node, by node name.

    The exporter writes the Conv nodes in the order the convolutions run, so the i-th
    Conv node is the i-th ``nn.Conv2d`` called in an eval forward pass.
    """
    import onnx

    order: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(lambda m, i, o: order.append(names[m])) for m in model.modules()
               if type(m) is nn.Conv2d]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, imgsz, imgsz, dtype=next(model.parameters()).dtype,
                                     device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    data = model_onnx(model, imgsz)
    convs = [n for n in onnx.load_from_string(data).graph.node if n.op_type == "Conv"]
    if len(convs) != len(order):  # a conv folded away or one run twice: name none rather than mismatch them
        return data, {}
    by_node = {}
    for node, name in zip(convs, order):
        by_node[node.name] = name
        by_node[node.output[0]] = name  # ORT's packed-layout pass renames a conv after its output (+ "_nchwc")
    return data, by_node


# --- the model ----------------------------------------------------------------------------------------------------

def conv_specs(model: nn.Module, imgsz: int, exclude: set[nn.Module] | None = None,
               fixed_out: set[nn.Module] | None = None) -> dict[nn.Conv2d, ConvSpec]:
    """Return the spec of every convolution inference runs at ``imgsz`` (those in ``exclude`` left out)."""
    exclude_ids = {id(m) for e in (exclude or ()) for m in e.modules()}
    fixed_ids = {id(m) for e in (fixed_out or ()) for m in e.modules()}
    act = {id(m.conv): not isinstance(m.act, nn.Identity) for m in model.modules()
           if hasattr(m, "conv") and isinstance(m.conv, nn.Conv2d) and hasattr(m, "act")}
    specs: dict[nn.Conv2d, ConvSpec] = {}
    image: list[torch.Tensor] = []

    def record(m: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]
        specs[m] = ConvSpec(m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                            tuple(m.padding), tuple(m.dilation), m.groups, x.shape[-2], x.shape[-1],
                            act.get(id(m), False), any(x is t for t in image), id(m) in fixed_ids)

    handles = [m.register_forward_hook(record) for m in model.modules()
               if type(m) is nn.Conv2d and id(m) not in exclude_ids and isinstance(m.padding, tuple)]
    was_training = model.training
    p = next(model.parameters())
    image.append(torch.zeros(1, 3, imgsz, imgsz, dtype=p.dtype, device=p.device))
    try:
        with torch.no_grad():
            model.eval()(image[0])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return specs


class LayerTable:
    """One layer's measured times over its width grid: rounded up to the block, interpolated, misalignment factors."""

    def __init__(self, spec: ConvSpec, cins: list[int], couts: list[int], ms: list[list[float]],
                 odd_in: float = 1.0, odd_out: float = 1.0, block: int = 8) -> None:
        self.spec, self.cins, self.couts = spec, cins, couts
        self.ms = np.asarray(ms, dtype=np.float64)
        self.odd_in, self.odd_out, self.block = odd_in, odd_out, block
        self.scale = 1.0  # the layer's time inside the network / its time alone, at full width (set by LatencyModel)

    def aligned(self, cin: int, cout: int) -> float:
        """Return the grid's bilinear interpolation at (cin, cout); below the grid, along its two lowest points."""
        row = np.array([_interp(cout, self.couts, r) for r in self.ms])
        return _interp(cin, self.cins, row)

    def _up(self, width: int, grid: list[int]) -> int:
        """Return ``width`` rounded up to the block the kernels compute anyway (never past the full width)."""
        return width if len(grid) == 1 else min(-(-width // self.block) * self.block, grid[-1])

    def alone(self, cin: int, cout: int) -> float:
        """Return the layer's predicted time alone in ms at ``cin`` -> ``cout`` channels."""
        spec = self.spec
        if spec.groups > 1 and not spec.depthwise:
            return float(self.ms[0, 0]) * cin * cout / (spec.cin * spec.cout)
        if spec.depthwise:
            cin = cout = min(cin, cout)
        t = self.aligned(self._up(cin, self.cins), self._up(cout, self.couts))
        if cout % ODD and len(self.couts) > 1:
            t *= self.odd_out
        if cin % ODD and len(self.cins) > 1 and not spec.depthwise:
            t *= self.odd_in
        return t

    def __call__(self, cin: int, cout: int) -> float:
        """Return the layer's predicted time in ms inside the network at ``cin`` -> ``cout`` channels."""
        return self.scale * self.alone(cin, cout)

    def to_dict(self) -> dict:
        return {"cin": self.cins, "cout": self.couts, "ms": self.ms.tolist(), "odd_in": self.odd_in,
                "odd_out": self.odd_out, "block": self.block}


def _interp(x: float, xs: list[int], ys: np.ndarray) -> float:
    if len(xs) == 1:
        return float(ys[0]) * x / xs[0]
    if x < xs[0]:
        # below the grid: the line through its two lowest points, not through zero: a layer's time has a part
        # that does not shrink with its width, and proportional scaling would promise savings that never come
        slope = (float(ys[1]) - float(ys[0])) / (xs[1] - xs[0])
        return max(float(ys[0]) - slope * (xs[0] - x), 0.0)
    return float(np.interp(x, xs, ys))


def measure_table(runtime: Runtime, spec: ConvSpec, reps: int) -> LayerTable:
    """Return the table of ``spec`` measured on ``runtime``."""
    cins, couts = spec.grids(runtime.block)
    if spec.depthwise:
        dw = _DepthwiseTable(spec, couts, [runtime.time_conv(spec, c, c, reps) for c in couts], block=runtime.block)
        odd = _misaligned(couts)
        if odd is not None:
            dw.odd_out = _factor(runtime.time_conv(spec, odd, odd, reps), dw.aligned(couts[-1], couts[-1]))
        return dw
    ms = [[runtime.time_conv(spec, ci, co, reps) for co in couts] for ci in cins]
    table = LayerTable(spec, cins, couts, ms, block=runtime.block)
    odd = _misaligned(couts)
    if odd is not None:  # compared with the block above it, which is what an aligned odd width would cost
        table.odd_out = _factor(runtime.time_conv(spec, cins[-1], odd, reps), table.aligned(cins[-1], couts[-1]))
    odd = _misaligned(cins)
    if odd is not None:
        table.odd_in = _factor(runtime.time_conv(spec, odd, couts[-1], reps), table.aligned(cins[-1], couts[-1]))
    return table


def _factor(measured: float, interpolated: float) -> float:
    # A misaligned width is never faster than the aligned width above it; a ratio below 1 is noise.
    return min(max(measured / max(interpolated, 1e-9), 1.0), 4.0)


class _DepthwiseTable(LayerTable):
    """A depthwise layer: one width (input = output = groups)."""

    def __init__(self, spec: ConvSpec, widths: list[int], ms: list[float], odd: float = 1.0, block: int = 8) -> None:
        super().__init__(spec, [spec.cin], widths, [ms], 1.0, odd, block)

    def aligned(self, cin: int, cout: int) -> float:
        return _interp(min(cin, cout), self.couts, self.ms[0])

    def to_dict(self) -> dict:
        return {**super().to_dict(), "depthwise": True}


def table_from_dict(spec: ConvSpec, d: Mapping) -> LayerTable:
    """Return a table read back from its cached dict."""
    if d.get("depthwise"):
        return _DepthwiseTable(spec, d["cout"], d["ms"][0], d["odd_out"], d["block"])
    return LayerTable(spec, d["cin"], d["cout"], d["ms"], d["odd_in"], d["odd_out"], d["block"])


SCALE_RANGE = (0.2, 5.0)  # a layer's in-network / alone ratio outside this is a mismatched node, not a cache effect


class LatencyModel:
    """Predicted latency (ms) of ``model`` at its current widths on one runtime; cheap to re-evaluate.

    ``model`` is the network at full width (the tables' grids are its widths); after it is
    pruned in place, ``__call__`` predicts the pruned network and ``delta`` the change a
    pruning would make before it is made.
    """

    def __init__(self, model: nn.Module, cfg: LatencyConfig, exclude: set[nn.Module] | None = None,
                 fixed_out: set[nn.Module] | None = None, progress: bool = False,
                 calibration: Callable[[], Sequence[nn.Module]] | None = None) -> None:
        self.cfg = cfg
        runtime = get_runtime(cfg.runtime, cfg.threads)
        self.block = runtime.block
        self.specs = conv_specs(model, cfg.imgsz, exclude, fixed_out)
        names = {m: n for n, m in model.named_modules()}
        self._by_name = {names[m]: m for m in self.specs}
        keys = sorted({s.key() for s in self.specs.values()})
        ident = {"version": CACHE_VERSION, **runtime.identity(), "imgsz": cfg.imgsz, "layers": keys,
                 "names": sorted(names[m] for m in self.specs)}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
        self.path = cfg.cache_path() / f"{cfg.runtime}-{digest}.json"
        self.measured = 0  # table points timed by this build (0 when read from the cache)
        self.other_load = 0.0  # other processes' share of the CPU while this build timed (see OtherLoad)
        t0 = time.perf_counter()
        cached = _load(self.path, {s.key(): s for s in self.specs.values()}, keys)
        record: dict | None = None  # what the cache file holds (None: not cached, a busy machine's table)
        if cached is not None:
            tables, net, record = cached
            LOGGER.info("latency table read from %s", self.path)
        else:
            tables = {}
            specs = {s.key(): s for s in self.specs.values()}
            with OtherLoad() as load:
                for k in tqdm(keys, desc=f"latency table ({cfg.runtime}, {cfg.imgsz} px)", disable=not progress):
                    tables[k] = measure_table(runtime, specs[k], cfg.reps)
                    self.measured += 1
                net = runtime.profile_model(model, cfg.imgsz, max(cfg.reps, 10))
            self.other_load = load.share
            if load.share > BUSY:  # a table timed on a busy machine is noise: used this once, never cached
                LOGGER.warning("latency table timed while other processes used %.0f %% of the CPU: not cached, and "
                               "its predictions are unreliable; build it on a quiet machine", 100 * load.share)
            else:
                record = {"identity": ident, "network": asdict(net), "seconds": time.perf_counter() - t0,
                          "other_load": load.share, "tables": {k: t.to_dict() for k, t in tables.items()}}
                _write(self.path, record)
                LOGGER.info("latency table for %d layers measured in %.0f s, cached in %s", len(keys),
                            time.perf_counter() - t0, self.path)
        # one table object per conv (layers of one shape share measurements, not their in-network scale)
        self.tables = {m: copy.copy(tables[s.key()]) for m, s in self.specs.items()}
        self.whole_ms = net.wall_ms
        self.volume = sum(_volume(m, s) for m, s in self.specs.items())  # feature-map elements the convs write
        if net.conv_ms:  # a per-node profile: each layer's table scaled to its time inside the network
            for m, t in self.tables.items():
                inside = net.conv_ms.get(names[m])
                alone = t.alone(m.in_channels, m.out_channels)
                if inside and alone > 0:
                    t.scale = min(max(inside / alone, SCALE_RANGE[0]), SCALE_RANGE[1])
            self.moving_ms = net.moving_ms
            self.fixed_ms = net.wall_ms - self.layers_ms() - self.moving_ms
        else:  # the whole network's time only: what the layers do not explain is fixed
            self.moving_ms = 0.0
            self.fixed_ms = net.wall_ms - self.layers_ms()
        self.table_fixed_ms = self.fixed_ms  # the fixed part as the profile splits it, before any calibration
        self.gain = 1.0  # the calibration's factor on the parts that follow the widths (see calibrate)
        self.calibration: dict | None = record.get("calibration") if record else None
        if self.calibration is None and calibration is not None:
            t1 = time.perf_counter()
            with OtherLoad() as load:
                self.calibration = {**self.calibrate(runtime, model, calibration()),
                                    "seconds": time.perf_counter() - t1}
            self.other_load = max(self.other_load, load.share)  # a busy calibration is no more trusted than a table
            if record is not None and load.share <= BUSY:
                _write(self.path, {**record, "calibration": self.calibration})
        if self.calibration is not None:
            self.apply(self.calibration)

    def layers_ms(self, model: nn.Module | None = None) -> float:
        """Return the sum of the layers' table times at the current widths of ``model`` (default: the network this
        was built on; another one is matched to it by module name: a copy, pruned otherwise)."""
        return sum(t(m.in_channels, m.out_channels) for m, t in self._pairs(model))

    def variable_ms(self, model: nn.Module | None = None) -> float:
        """Return the uncalibrated time of what follows the widths: the layers and the volume-bound ops."""
        layers = volume = 0.0
        for m, t in self._pairs(model):  # one pass: the pruning loop asks this after every group
            layers += t(m.in_channels, m.out_channels)
            volume += _volume(m, t.spec)
        return layers + self.moving_ms * volume / self.volume

    def _pairs(self, model: nn.Module | None) -> list[tuple[nn.Conv2d, LayerTable]]:
        if model is None:
            return list(self.tables.items())
        return [(m, self.tables[self._by_name[n]]) for n, m in model.named_modules() if n in self._by_name]

    def calibrate(self, runtime: Runtime, model: nn.Module, copies: Sequence[nn.Module]) -> dict:
        """Time ``copies`` of ``model`` (the network at full width), each pruned alike in every layer, against it on
        the runtime, and return the fixed part that makes the table's predicted speed-ups match the measured ones.

        The profile's split into layers, volume-bound ops and a fixed rest is taken once, at one
        moment, and the rest carries that moment's noise and the gaps between nodes: at 640 px
        yolo11n's fixed part read 13.4 ms in its table against 5.7-7.3 ms of its nodes, and
        tables built on a noisy machine were 17-52 % pessimistic. Here the time is modelled as
        ``gain * variable + fixed`` (``variable_ms``: the tables and the volume-bound ops), the
        ratio fixed / gain solved from each copy's measured speed-up (paired rounds, median of
        three timings) and averaged; ``apply`` then sets gain and fixed so that the unpruned
        network still predicts its profiled time.
        """
        base = self.variable_ms()
        points = []
        base_run = runtime.runner(model, self.cfg.imgsz)  # exported once for all the copies
        for c in copies:
            runs = (base_run, runtime.runner(c, self.cfg.imgsz))
            measured = statistics.median(runtime.speed_up(model, c, self.cfg.imgsz, runs=runs) for _ in range(3))
            points.append({"variable_ms": self.variable_ms(c), "measured_speed_up": measured,
                           "table_speed_up": (base + self.table_fixed_ms) / (self.variable_ms(c) + self.table_fixed_ms)})
        # measured = (r + base) / (r + variable)  =>  r = (base - measured * variable) / (measured - 1)
        ratios = [(base - p["measured_speed_up"] * p["variable_ms"]) / (p["measured_speed_up"] - 1) for p in points
                  if p["measured_speed_up"] > 1.02]  # a copy timed no faster than the base says nothing of the split
        # The fit may come out negative: the layers' time then falls faster with their widths than their tables say
        # (yolov8n at 160 px: -0.66 and -0.62 ms from the two copies, against the profile's -0.89; 0 would have
        # predicted 1.51x and 2.07x for copies measured 1.64x and 2.47x; timed again an hour later, the same copies
        # read 1.46x and 2.22x: the fit is as good as the machine's timings). Bounded, so that no network pruned to
        # half the narrowest copy's time is predicted infinitely fast.
        floor = -0.5 * min((p["variable_ms"] for p in points), default=0.0)
        fixed = max(statistics.fmean(ratios), floor) if ratios else self.table_fixed_ms
        LOGGER.info("latency table calibrated on %d narrowed copies: fixed part %.2f of %.2f ms (profile: %.2f ms)",
                    len(points), fixed, base + fixed, self.table_fixed_ms)
        return {"base_variable_ms": base, "fixed_per_gain_ms": fixed, "points": points}

    def apply(self, calibration: Mapping) -> None:
        """Set ``gain`` and ``fixed_ms`` from a calibration (``calibrate``), keeping the full network's prediction."""
        base, fixed = calibration["base_variable_ms"], calibration["fixed_per_gain_ms"]
        self.gain = (self.variable_ms() + self.table_fixed_ms) / (base + fixed)
        self.fixed_ms = self.gain * fixed

    def table_only(self, model: nn.Module | None = None) -> float:
        """Return the prediction (ms) at the current widths without the calibration (the profile's split)."""
        return self.variable_ms(model) + self.table_fixed_ms

    def __call__(self, model: nn.Module | None = None) -> float:
        """Return the predicted latency in ms at the current widths of ``model`` (default: the network this was
        built on)."""
        return self.gain * self.variable_ms(model) + self.fixed_ms

    def delta(self, changes: Mapping[nn.Module, tuple[int, int]]) -> float:
        """Return the predicted change in ms if the convs in ``changes`` lost (inputs, outputs) channels."""
        d = 0.0
        for m, (din, dout) in changes.items():
            t = self.tables.get(m)
            if t is None:
                continue
            cin, cout = m.in_channels, m.out_channels
            if t.spec.depthwise:
                din = dout = max(din, dout)
            d += t(max(cin - din, 1), max(cout - dout, 1)) - t(cin, cout)
            d -= self.moving_ms * dout * _volume(m, t.spec) / m.out_channels / self.volume
        return self.gain * d


def _volume(m: nn.Conv2d, spec: ConvSpec) -> int:
    """Return the elements of ``m``'s output feature map at its current width."""
    h, w = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
            zip((spec.height, spec.width), spec.padding, spec.dilation, spec.kernel, spec.stride))
    return m.out_channels * h * w


def _load(path: Path, specs: Mapping[str, ConvSpec],
          keys: list[str]) -> tuple[dict[str, LayerTable], NetProfile, dict] | None:
    """Return the tables and network profile cached at ``path``; None where there are none or they do not parse
    (another layout under the same version, a truncated file): those are measured again and overwritten."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or not JSON
        return None
    try:
        tables = {k: table_from_dict(specs[k], cached["tables"][k]) for k in keys}
        return tables, NetProfile(**cached["network"]), cached
    except (KeyError, TypeError, ValueError, IndexError) as e:
        LOGGER.warning("latency table %s does not read as this version's layout (%s): measured again", path, e)
        return None


def _write(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError as e:  # a read-only home must not stop pruning: the next run measures again
        LOGGER.warning("latency table not cached (%s)", e)


def measure_speed_up(base: nn.Module, pruned: nn.Module, imgsz: int, threads: int = 2, rounds: int = 15,
                     reps: int | None = None) -> dict:
    """Return the measured ONNX Runtime CPU speed-up of ``pruned`` over ``base`` (``Runtime.speed_up``), with detail.

    ``speed_up`` is the median of the rounds' paired ratios (as ``Runtime.speed_up``); also the ratio of the
    fastest runs overall (``fastest_ratio``, the figure before 2026-12-03), the fastest times, the ratios'
    spread, and the speed-up of the sums of each node's fastest time, which a busy machine barely moves
    (measured with 13 runnable processes on 2 cores: one or two nodes of a 5 ms run took 20-30 ms each).
    """
    rt = OnnxRuntime(threads)
    with OtherLoad() as load:
        base_ms, pruned_ms = rt.paired_times(base, pruned, imgsz, rounds, reps)
    ratios = [b / p for b, p in zip(base_ms, pruned_ms)]
    nodes = [sum(rt.node_times(model_onnx(m, imgsz), (1, 3, imgsz, imgsz), 10)[0].values()) for m in (base, pruned)]
    return {"speed_up": paired_ratio(base_ms, pruned_ms), "fastest_ratio": min(base_ms) / min(pruned_ms),
            "base_ms": min(base_ms), "pruned_ms": min(pruned_ms), "rounds": rounds,
            "ratio_iqr": float(np.subtract(*np.percentile(ratios, [75, 25]))) if len(ratios) > 1 else math.nan,
            "node_speed_up": nodes[0] / nodes[1], "node_base_ms": nodes[0], "node_pruned_ms": nodes[1],
            "other_load": load.share, "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
