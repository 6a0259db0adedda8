"""Delta compression: sparse, ternary, 1-bit, quantised and low-rank deltas (see
docs/compression.md).

```python
from deltatune import compress as dc
c = dc.compress_adapter("runs/bbc/adapter", "compeft", density=0.1)  # any deltatune adapter dir
c.save("runs/bbc/adapter-compeft"); print(c.ratio)  # dt.load_adapter reads it as is
# a full fine-tuning delta
c = dc.compress_checkpoint("ft.safetensors", "base.safetensors", "bitdelta")
dc.load_compressed("out").to_task_vector().apply_to(base_model)
```
"""

from .codecs import CODECS, CompressError, decode
from .container import (
    CompressedDelta,
    compress_adapter,
    compress_checkpoint,
    compress_task_vector,
    compress_tensors,
    describe,
    load_compressed,
)
from .tuning import calibrate_scales, extract_lora, search_alpha

__all__ = [
    "CODECS",
    "CompressError",
    "CompressedDelta",
    "calibrate_scales",
    "compress_adapter",
    "compress_checkpoint",
    "compress_task_vector",
    "compress_tensors",
    "decode",
    "describe",
    "extract_lora",
    "load_compressed",
    "search_alpha",
]
