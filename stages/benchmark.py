"""Stage benchmark: params, MACs, mAP and ONNX Runtime latency of baseline vs fine-tuned, side by side."""

from yoloprune.errors import exit_on_error

exit_on_error()  # first: an entry point (Ultralytics offline before anything imports it, one-line errors)

import json

from yoloprune.benchmark import BenchmarkConfig, benchmark_many, compare, format_table, tradeoff_points
from yoloprune.io import atomic_path, write_json
from yoloprune.params import data_yaml, load_params

params = load_params()
cfg = BenchmarkConfig.from_params(params, runtime="onnx", data=str(data_yaml(params)))
# timed taking turns (time_interleaved): a slow spell of the machine cannot land on one of them only; control: the baseline
# fine-tuned alike, unpruned (stage control)
base, tuned, control = benchmark_many(["models/baseline.pt", "models/finetuned.pt", "models/control.pt"], cfg)
cmp = compare(base, tuned)
print(format_table(cmp))
vs_control = compare(control, tuned).get("map50_95_retention_pct")
flat = {  # each figure once across metrics/ (the pruned mAP: prune.json, ONNX parity: export.json)
    "baseline_map50_95": base.get("map50_95"),
    "finetuned_map50_95": tuned.get("map50_95"),
    "retention_pct": cmp.get("map50_95_retention_pct"),
    # against the baseline trained as long as the pruned model in all (baseline + fine-tune): what pruning cost
    "control_map50_95": control.get("map50_95"),
    "retention_vs_control_pct": vs_control,
    "baseline_params": base["params"], "finetuned_params": tuned["params"],
    "baseline_macs": base["macs"], "finetuned_macs": tuned["macs"],
    "macs_speed_up": cmp.get("macs_speed_up"),
    # each round's fastest call, median over rounds: what latency_speed_up compares (benchmark_full.json: the rest)
    "baseline_latency_ms": base["latency_best_ms"], "finetuned_latency_ms": tuned["latency_best_ms"],
    "latency_speed_up": cmp.get("latency_speed_up"),
}
write_json(flat, "metrics/benchmark.json")
write_json({"base": base, "pruned": tuned, "control": control, "compare": cmp}, "metrics/benchmark_full.json")
points = tradeoff_points(base, tuned, cmp.get("macs_speed_up"), params["method"])
with atomic_path("metrics/tradeoff.json") as tmp:  # a list (write_json takes a dict), for the scatter plot
    tmp.write_text(json.dumps(points, indent=2) + "\n")
