"""``pneumoscope adapt``: a new hospital's few hundred labelled films -> a cross-validated local model and a site
report (run.py). Strategies in strategies.py, partial fine-tuning in finetune.py, local validation in validate.py,
the films and their folds in site.py, per-film features in views.py, the report in report.py. See docs/adapt.md."""
