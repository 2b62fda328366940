"""Meta-training and meta-testing runs behind `python -m fastmeta train|eval`, one job a module:

- config.py      RunConfig: every setting of a run, its defaults per dataset and learner, its checks
- build.py       the model and the episodes a RunConfig asks for (datasets: fastmeta.data.registry)
- step.py        one meta-step as the loop takes it, and its logged numbers
- loop.py        train(): the loop, validation, atomic checkpoints that resume, time limits, divergence
- checkpoint.py  writing and reading checkpoints, loading them into a model and optimiser
- evaluation.py  evaluate_model(), evaluate() of a checkpoint, summarize_run() beside a baseline
- plot.py        learning curves; several runs against wall-clock (python -m fastmeta plot)
- prefetch.py    the next episode built on a background thread while the step runs
"""

from fastmeta.algorithms.common import zero_head
from fastmeta.data.registry import DATASETS
from fastmeta.models import BACKBONES
from fastmeta.train.build import build_model, datasets, to_device
from fastmeta.train.checkpoint import load_checkpoint, load_states, save_checkpoint
from fastmeta.train.config import SCHEDULES, RunConfig, unread_option
from fastmeta.train.evaluation import evaluate, evaluate_model, summarize_run
from fastmeta.train.loop import Diverged, train
from fastmeta.train.plot import plot_history, plot_runs
from fastmeta.train.step import StepNumbers, train_step

__all__ = [
    "RunConfig", "train", "evaluate", "evaluate_model", "summarize_run", "save_checkpoint", "load_checkpoint",
    "load_states", "plot_history", "plot_runs", "zero_head", "DATASETS", "BACKBONES", "SCHEDULES", "build_model",
    "datasets", "to_device", "train_step", "StepNumbers", "Diverged", "unread_option",
]  # fmt: skip
