"""Stage finetune: recover accuracy with the Ultralytics trainer on the pruned network itself."""

from yoloprune.errors import exit_on_error

exit_on_error()  # first: an entry point (Ultralytics offline before anything imports it, one-line errors)

from pathlib import Path

from yoloprune.config import FinetuneConfig
from yoloprune.curves import results_text
from yoloprune.finetune import can_resume, finetune
from yoloprune.io import load_model, save_model, write_json, write_text
from yoloprune.params import data_yaml, load_params
from yoloprune.train import TEACHER_SECONDS

PRUNED, RUN, TEACHER = Path("models/pruned.pt"), Path("runs/finetune"), Path("models/baseline.pt")

params = load_params()
f, data = FinetuneConfig.from_params(params), data_yaml(params)
settings = f.settings(params["imgsz"])
settings.update(teacher=TEACHER if f.distill.terms else None, distill=f.distill)  # the unpruned baseline teaches
result = finetune(PRUNED, data, device=str(f.device), workers=f.workers, threads=f.threads, out_dir=RUN,
                  resume=can_resume(RUN, PRUNED, data, **settings), **settings)  # a re-run after a kill resumes
save_model(load_model(result.best), "models/finetuned.pt", {"epochs": result.epochs})
# The fine-tuned mAP is the benchmark stage's to measure; the epochs completed are this run's (patience may stop it).
write_json({"finetune_epochs": result.epochs}, "metrics/finetune.json")  # unique names: bare `dvc exp show` columns
# Timings change on every run: a cached output (logs/), not a metric. results.csv's `time` is the run's cumulative
# seconds at each epoch's end; TEACHER_SECONDS the distillation teacher's forward passes in each epoch.
seconds = result.rows[-1].get("time") if result.rows else None
teacher = [float(r[TEACHER_SECONDS]) for r in result.rows if r.get(TEACHER_SECONDS)]
write_json({"seconds": float(seconds) if seconds else None, "teacher_seconds": sum(teacher) if teacher else None},
           "logs/finetune.json")
write_text(results_text(result.rows), "metrics/finetune_curves.csv")  # for `dvc plots`
