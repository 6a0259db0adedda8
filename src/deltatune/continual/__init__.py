"""Continual adaptation with deltas: task streams, strategies, forgetting (see docs/continual.md).

```python
from deltatune import continual as cl
stream = cl.make_stream("split-mnist", limit_train=2000)
result = cl.run_stream(model, collate, stream, cl.make_strategy("lae"), TrainConfig(max_steps=100),
                       spec=dt.LoRA(r=4), head=["head"])
result.accuracy_matrix, result.average_accuracy, result.forgetting
```
"""

from .runner import ContinualResult, metrics, plot_matrix, run_stream
from .strategies import STRATEGIES, Reservoir, Strategy, make_strategy
from .streams import STREAMS, ContinualError, Stream, Task, make_stream

__all__ = [
    "STRATEGIES",
    "STREAMS",
    "ContinualError",
    "ContinualResult",
    "Reservoir",
    "Stream",
    "Strategy",
    "Task",
    "make_strategy",
    "make_stream",
    "metrics",
    "plot_matrix",
    "run_stream",
]
