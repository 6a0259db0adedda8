"""Reading and writing deltas: deltatune's directory format and peft's adapter layout."""

from .adapter import detect_format, load_adapter, read_adapter_info, save_adapter
from .files import atomic_write, load_tensors, read_json, save_tensors, write_json

__all__ = [
    "atomic_write",
    "detect_format",
    "load_adapter",
    "load_tensors",
    "read_adapter_info",
    "read_json",
    "save_adapter",
    "save_tensors",
    "write_json",
]
