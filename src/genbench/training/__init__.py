"""Training: one loop for every model, its checkpoints, the run folder, and data parallelism.

- config.py: TrainConfig (per-stage overrides), the learning-rate schedule;
- loop.py: the training loop (stages, optimizer groups, EMA, bf16, exact resume, NaN stop);
- checkpoint.py: the training checkpoint format (atomic, hash-checked, validated on load);
- run_folder.py: the run folder format (run.json, log.jsonl, checkpoints/, model/), one owner;
- run.py: a run from request to exported model (configs from presets and --set, train, export);
- distributed.py: torchrun data parallelism (process group, gradient averaging, rank 0 does I/O).
"""

from .config import TrainConfig
from .run import load_training_data, resolve_configs, train_run
from .run_folder import RunFolder

__all__ = ["RunFolder", "TrainConfig", "load_training_data", "resolve_configs", "train_run"]
