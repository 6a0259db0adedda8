"""Training deltas: ``fit`` (accelerate underneath), ``evaluate``, resumable checkpoints, callbacks.

    from deltatune.train import TrainConfig, fit, evaluate
    result = fit(model, train_ds, collate, TrainConfig(epochs=3, lr=1e-3), eval_data=val_ds,
                 out_dir="runs/x", task="text-classification")
    print(result.best, evaluate(model, test_ds, collate, task="text-classification"))

Only the parameters with ``requires_grad`` are trained; see docs/training.md.
"""

from .callbacks import BaseCallback, Callback, callbacks_from_specs
from .config import CheckpointError, TrainConfig, TrainError
from .losses import compute_loss, evaluate
from .report import TrainResult
from .trainer import fit

__all__ = [
    "BaseCallback",
    "Callback",
    "CheckpointError",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "callbacks_from_specs",
    "compute_loss",
    "evaluate",
    "fit",
]
