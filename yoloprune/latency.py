"""Predict a network's latency on its deployment runtime from its layer widths (a HALP-style lookup table).

Every convolution the deployed network runs is timed alone on the runtime (ONNX Runtime
on CPU by default, PyTorch on CPU or CUDA) at its own input size, kernel and stride,
over a grid of input/output channel counts: 1/4, 1/2, 3/4 and all of its channels, in
multiples of ``ALIGN``. Widths that are not multiples of ``ALIGN`` run slower on vector
CPUs (measured on ONNX Runtime, 64 -> 63 output channels at 80x80 px: 1.4-2x the time),
so each layer also times one such width per dimension and keeps the ratio as its
misalignment factor. A layer's time at any width is the grid interpolated (bilinear),
times that factor where the width is misaligned. What pruning does not touch (the image
input, concatenations, upsampling, decoding, attention products) is the rest: the whole
network's measured time minus the sum of its layers' predictions at full width. Part of
it moves feature maps (concatenations, splits, additions, upsampling, pooling: 14 % of
yolov8n's time at 160 px on ONNX Runtime) and shrinks with the channels, so where the
runtime's profiler tells that part apart it scales with the layers' output volume; the
rest (the head's decoding, attention products) is a fixed cost.

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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from yoloprune.errors import YoloPruneError, check_imgsz
from yoloprune.runtime import time_calls
from yoloprune.threads import torch_threads_kept

LOGGER = logging.getLogger("yoloprune")

ALIGN = 8  # CPU vector kernels (MLAS, oneDNN) pack channels by 8 (AVX2) or 16 (AVX-512)
GRID = (0.25, 0.5, 0.75, 1.0)  # share of a layer's channels timed per dimension: max_layer_ratio 0.75 reaches 1/4
MOVING_OPS = ("Concat", "Split", "Add", "Upsample", "Resize", "MaxPool", "Slice")  # cost ~ feature-map volume
CACHE_VERSION = 2  # bump when the table's layout or measuring changes, so old caches are not read


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

    def grids(self) -> tuple[list[int], list[int]]:
        """Return the input and output widths timed for this layer."""
        if self.depthwise:
            g = _grid(self.cout, self.cout_fixed)
            return g, g
        if self.groups > 1:  # grouped, not depthwise: rare in YOLO; timed at full width, scaled with MACs
            return [self.cin], [self.cout]
        return _grid(self.cin, self.cin_fixed), _grid(self.cout, self.cout_fixed)


def _grid(full: int, fixed: bool) -> list[int]:
    if fixed or full <= ALIGN:
        return [full]
    return sorted({max(ALIGN, round(full * r / ALIGN) * ALIGN) for r in GRID} | {full})


def _misaligned(grid: list[int]) -> int | None:
    """Return a width near the top of ``grid`` that is not a multiple of ALIGN (None for a fixed dimension)."""
    if len(grid) < 2:
        return None
    return grid[-1] - ALIGN // 2 - 1


# --- runtimes ---------------------------------------------------------------------------------------------------

class Runtime:
    """Times single convolutions and whole networks on one backend; a subclass per backend, registered by name."""

    name = ""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def identity(self) -> dict:
        """Return what a timing depends on besides the network: the machine and the libraries."""
        from ultralytics.utils.torch_utils import get_cpu_info  # the CPU name runtime.machine_info reports too

        return {"runtime": self.name, "cpu": get_cpu_info(), "torch": torch.__version__, "threads": self.threads}

    def time_conv(self, spec: ConvSpec, cin: int, cout: int, reps: int) -> float:
        """Return the time in ms of ``spec`` at ``cin`` -> ``cout`` channels (minimum over ``reps`` runs)."""
        raise NotImplementedError

    def time_model(self, model: nn.Module, imgsz: int, reps: int) -> float:
        """Return the time in ms of one batch-1 inference of ``model`` (minimum over ``reps`` runs)."""
        return self.time_model_parts(model, imgsz, reps)[0]

    def time_model_parts(self, model: nn.Module, imgsz: int, reps: int) -> tuple[float, float]:
        """Return the whole network's time in ms and the part of it spent moving feature maps (0 if unknown)."""
        raise NotImplementedError


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

    def time_conv(self, spec: ConvSpec, cin: int, cout: int, reps: int) -> float:
        session = self.session(conv_onnx(spec, cin, cout))
        x = {"x": np.random.default_rng(0).random((1, cin, spec.height, spec.width), dtype=np.float32)}
        return _best(lambda: session.run(None, x), reps)

    def time_model_parts(self, model: nn.Module, imgsz: int, reps: int) -> tuple[float, float]:
        """Return the sum over the graph's nodes of each node's fastest of ``reps`` runs (ONNX Runtime's profiler).

        A whole run of a 640-px network lasts long enough to be interrupted by other
        processes (measured with 8 busy processes on 2 cores: fastest of 12 runs 160 ms,
        sum of its nodes' fastest 69 ms); its nodes, like the table's single layers, last
        milliseconds and are timed on the same footing.
        """
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            session = self.session(model_onnx(model, imgsz), profile=str(Path(tmp) / "profile"))
            x = {session.get_inputs()[0].name: np.random.default_rng(0).random((1, 3, imgsz, imgsz),
                                                                                   dtype=np.float32)}
            for _ in range(reps + 2):
                session.run(None, x)
            events = json.loads(Path(session.end_profiling()).read_text())
        nodes: dict[str, list[float]] = {}
        ops: dict[str, str] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                nodes.setdefault(e["name"], []).append(e["dur"] / 1000)
                ops[e["name"]] = e.get("args", {}).get("op_name", "")
        best = {k: min(v[2:] or v) for k, v in nodes.items()}  # the first two runs are warm-up
        return sum(best.values()), sum(t for k, t in best.items() if ops[k] in MOVING_OPS)


@register("torch")
class TorchRuntime(Runtime):
    """PyTorch eager on the CPU with ``threads`` threads (set for the timing only, then restored)."""

    device = torch.device("cpu")

    def time_conv(self, spec: ConvSpec, cin: int, cout: int, reps: int) -> float:
        groups = cin if spec.depthwise else spec.groups
        conv = nn.Conv2d(cin, cout, spec.kernel, spec.stride, spec.padding, spec.dilation, groups)
        layer = nn.Sequential(conv, nn.SiLU()) if spec.act else conv
        return self._time(layer, torch.rand(1, cin, spec.height, spec.width), reps)

    def time_model_parts(self, model: nn.Module, imgsz: int, reps: int) -> tuple[float, float]:
        return self._time(copy.deepcopy(model), torch.rand(1, 3, imgsz, imgsz), reps), 0.0

    def _time(self, layer: nn.Module, x: torch.Tensor, reps: int) -> float:
        layer, x = layer.to(self.device).eval(), x.to(self.device)
        with torch_threads_kept(self.threads), torch.inference_mode():
            return _best(lambda: layer(x), reps, self.device)


@register("cuda")
class CudaRuntime(TorchRuntime):
    """PyTorch eager on the first CUDA GPU (fp32)."""

    def __init__(self, threads: int) -> None:
        super().__init__(threads)
        if not torch.cuda.is_available():
            raise YoloPruneError("runtime 'cuda' needs a CUDA GPU, and torch sees none; set prune.runtime: "
                                 "onnxruntime (CPU) or torch, or run on a machine with a GPU")
        self.device = torch.device("cuda", 0)

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
    """One layer's measured times over its width grid, interpolated, with its misalignment factors."""

    def __init__(self, spec: ConvSpec, cins: list[int], couts: list[int], ms: list[list[float]],
                 odd_in: float = 1.0, odd_out: float = 1.0) -> None:
        self.spec, self.cins, self.couts = spec, cins, couts
        self.ms = np.asarray(ms, dtype=np.float64)
        self.odd_in, self.odd_out = odd_in, odd_out

    def aligned(self, cin: int, cout: int) -> float:
        """Return the grid's bilinear interpolation at (cin, cout); below the grid, proportional to the width."""
        row = np.array([_interp(cout, self.couts, r) for r in self.ms])
        return _interp(cin, self.cins, row)

    def __call__(self, cin: int, cout: int) -> float:
        """Return the predicted time in ms at ``cin`` -> ``cout`` channels."""
        spec = self.spec
        if spec.groups > 1 and not spec.depthwise:
            return float(self.ms[0, 0]) * cin * cout / (spec.cin * spec.cout)
        if spec.depthwise:
            cin = cout = min(cin, cout)
        t = self.aligned(cin, cout)
        if cout % ALIGN and len(self.couts) > 1:
            t *= self.odd_out
        if cin % ALIGN and len(self.cins) > 1 and not spec.depthwise:
            t *= self.odd_in
        return t

    def to_dict(self) -> dict:
        return {"cin": self.cins, "cout": self.couts, "ms": self.ms.tolist(), "odd_in": self.odd_in,
                "odd_out": self.odd_out}


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
    cins, couts = spec.grids()
    if spec.depthwise:
        dw = _DepthwiseTable(spec, couts, [runtime.time_conv(spec, c, c, reps) for c in couts])
        odd = _misaligned(couts)
        if odd is not None:
            dw.odd_out = _factor(runtime.time_conv(spec, odd, odd, reps), dw.aligned(odd, odd))
        return dw
    ms = [[runtime.time_conv(spec, ci, co, reps) for co in couts] for ci in cins]
    table = LayerTable(spec, cins, couts, ms)
    odd = _misaligned(couts)
    if odd is not None:
        table.odd_out = _factor(runtime.time_conv(spec, cins[-1], odd, reps), table.aligned(cins[-1], odd))
    odd = _misaligned(cins)
    if odd is not None:
        table.odd_in = _factor(runtime.time_conv(spec, odd, couts[-1], reps), table.aligned(odd, couts[-1]))
    return table


def _factor(measured: float, interpolated: float) -> float:
    # A misaligned width is never faster than its aligned neighbours' interpolation; a ratio below 1 is noise.
    return min(max(measured / max(interpolated, 1e-9), 1.0), 4.0)


class _DepthwiseTable(LayerTable):
    """A depthwise layer: one width (input = output = groups)."""

    def __init__(self, spec: ConvSpec, widths: list[int], ms: list[float], odd: float = 1.0) -> None:
        super().__init__(spec, [spec.cin], widths, [ms], 1.0, odd)

    def aligned(self, cin: int, cout: int) -> float:
        return _interp(min(cin, cout), self.couts, self.ms[0])

    def to_dict(self) -> dict:
        return {**super().to_dict(), "depthwise": True}


def table_from_dict(spec: ConvSpec, d: Mapping) -> LayerTable:
    """Return a table read back from its cached dict."""
    if d.get("depthwise"):
        return _DepthwiseTable(spec, d["cout"], d["ms"][0], d["odd_out"])
    return LayerTable(spec, d["cin"], d["cout"], d["ms"], d["odd_in"], d["odd_out"])


class LatencyModel:
    """Predicted latency (ms) of ``model`` at its current widths on one runtime; cheap to re-evaluate.

    ``model`` is the network at full width (the tables' grids are its widths); after it is
    pruned in place, ``__call__`` predicts the pruned network and ``delta`` the change a
    pruning would make before it is made.
    """

    def __init__(self, model: nn.Module, cfg: LatencyConfig, exclude: set[nn.Module] | None = None,
                 fixed_out: set[nn.Module] | None = None, progress: bool = False) -> None:
        self.cfg = cfg
        runtime = get_runtime(cfg.runtime, cfg.threads)
        self.specs = conv_specs(model, cfg.imgsz, exclude, fixed_out)
        keys = sorted({s.key() for s in self.specs.values()})
        ident = {"version": CACHE_VERSION, **runtime.identity(), "imgsz": cfg.imgsz, "layers": keys}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
        self.path = cfg.cache_path() / f"{cfg.runtime}-{digest}.json"
        self.measured = 0  # table points timed by this build (0 when read from the cache)
        t0 = time.perf_counter()
        cached = _read(self.path)
        if cached is not None:
            by_key = {s.key(): s for s in self.specs.values()}
            tables = {k: table_from_dict(by_key[k], cached["tables"][k]) for k in keys}
            whole, moving = float(cached["whole_ms"]), float(cached["moving_ms"])
            LOGGER.info("latency table read from %s", self.path)
        else:
            tables = {}
            specs = {s.key(): s for s in self.specs.values()}
            for k in tqdm(keys, desc=f"latency table ({cfg.runtime}, {cfg.imgsz} px)", disable=not progress):
                tables[k] = measure_table(runtime, specs[k], cfg.reps)
                self.measured += 1
            whole, moving = runtime.time_model_parts(model, cfg.imgsz, max(cfg.reps, 10))
            _write(self.path, {"identity": ident, "whole_ms": whole, "moving_ms": moving,
                               "seconds": time.perf_counter() - t0,
                               "tables": {k: t.to_dict() for k, t in tables.items()}})
            LOGGER.info("latency table for %d layers measured in %.0f s, cached in %s", len(keys),
                        time.perf_counter() - t0, self.path)
        self.tables = {m: tables[s.key()] for m, s in self.specs.items()}
        self.whole_ms = whole
        self.volume = sum(_volume(m, s) for m, s in self.specs.items())  # feature-map elements the convs write
        rest = whole - self.layers_ms()
        self.moving_ms = min(max(moving, 0.0), max(rest, 0.0))  # at full volume
        self.fixed_ms = rest - self.moving_ms

    def layers_ms(self) -> float:
        """Return the sum of the layers' predicted times at their current widths."""
        return sum(t(m.in_channels, m.out_channels) for m, t in self.tables.items())

    def __call__(self) -> float:
        """Return the predicted latency in ms at the current widths."""
        volume = sum(_volume(m, s) for m, s in self.specs.items())
        return self.layers_ms() + self.fixed_ms + self.moving_ms * volume / self.volume

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
        return d


def _volume(m: nn.Conv2d, spec: ConvSpec) -> int:
    """Return the elements of ``m``'s output feature map at its current width."""
    h, w = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
            zip((spec.height, spec.width), spec.padding, spec.dilation, spec.kernel, spec.stride))
    return m.out_channels * h * w


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
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
                     reps: int = 5) -> dict:
    """Return the measured ONNX Runtime CPU speed-up of ``pruned`` over ``base``: median of paired ratios.

    Both are exported, then timed in ``rounds`` short rounds, every other one in reverse
    order, each round's ratio from the two models' fastest of ``reps`` runs, so the machine's
    drift (other processes, clock changes) cancels in each pair.
    """
    rt = OnnxRuntime(threads)
    sessions = [rt.session(model_onnx(m, imgsz)) for m in (base, pruned)]
    feeds = [{s.get_inputs()[0].name: np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)}
             for s in sessions]
    ms: list[list[float]] = [[], []]
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            ms[i].append(_best(lambda i=i: sessions[i].run(None, feeds[i]), reps))
    ratios = [b / p for b, p in zip(*ms)]
    # On a machine busy with other work, whole runs are preempted (measured with 13 runnable processes on 2 cores:
    # one or two nodes of a 5 ms run took 20-30 ms each); the sum of each node's fastest time does not see that.
    nodes = [rt.time_model(m, imgsz, max(reps, 10)) for m in (base, pruned)]
    return {"speed_up": statistics.median(ratios), "base_ms": statistics.median(ms[0]),
            "pruned_ms": statistics.median(ms[1]), "rounds": rounds,
            "ratio_iqr": float(np.subtract(*np.percentile(ratios, [75, 25]))) if len(ratios) > 1 else math.nan,
            "node_speed_up": nodes[0] / nodes[1], "node_base_ms": nodes[0], "node_pruned_ms": nodes[1],
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
