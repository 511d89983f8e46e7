"""Studies that train or compare models: the study's 5/7/10-epoch reproduction, model comparison, the image-size
experiment, the hardware benchmark, and the build of the bundled default model. Each is a function returning its
rows/metrics (and writing its table); the CLI (cli/train.py, cli/experiment.py) is a thin layer over them."""
