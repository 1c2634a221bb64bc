"""Stage export_onnx: export the baseline, fine-tuned and control models to ONNX, checking parity with PyTorch."""

from yoloprune.errors import exit_on_error

exit_on_error()  # first: an entry point (Ultralytics offline before anything imports it, one-line errors)

from yoloprune.export import ExportConfig, export_model
from yoloprune.io import write_json
from yoloprune.params import load_params

params = load_params()
cfg = ExportConfig.from_params(params)
metrics = {}
for name in ("baseline", "finetuned", "control"):  # the benchmark times all three
    report = export_model(f"models/{name}.pt", cfg, out=f"models/{name}_{params['imgsz']}_b1.onnx")
    metrics[f"{name}_parity_rel_error"] = report.max_rel_error
write_json(metrics, "metrics/export.json")
