"""Stage convert: swap split-based blocks for equivalent pruning-friendly ones; record the equivalence error."""

from yoloprune.errors import exit_on_error

exit_on_error()  # first: an entry point (Ultralytics offline before anything imports it, one-line errors)

import copy

import torch

from yoloprune.convert import convert_model
from yoloprune.io import load_model, save_model, write_json
from yoloprune.params import load_params

params = load_params()
model = load_model("models/baseline.pt").eval()
original = copy.deepcopy(model).double()
blocks = convert_model(model)
x = torch.rand(1, 3, params["imgsz"], params["imgsz"], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    ref, got = original(x), copy.deepcopy(model).double()(x)
ref, got = (r[0] if isinstance(r, (tuple, list)) else r for r in (ref, got))
error = float((ref - got).abs().max() / ref.abs().max())
save_model(model, "models/converted.pt", {"converted_blocks": blocks})
write_json({"converted_blocks": blocks, "equivalence_rel_error": error}, "metrics/convert.json")
