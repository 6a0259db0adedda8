"""What the deployment jobs (`deltatune detect`, `estimate`, `adapt`) share: reading feature and
logit files, loading a model entry and a dataset's batches, small-sample warnings, plot plumbing."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from .common import CLIError

FEATURE_SUFFIXES = (".npy", ".safetensors")


def read_features(path: Path, key: Optional[str] = None):
    """A (samples, features) tensor from a .npy file (no pickles) or a safetensors file (``key``, or
    its only tensor)."""
    import numpy as np
    import torch

    if not path.is_file():
        raise CLIError(
            f"{path} does not exist; give a .npy or .safetensors feature file, or a dataset name "
            "with --model"
        )
    if path.suffix == ".npy":
        try:
            array = np.load(
                path, allow_pickle=False
            )  # never unpickle: an object array is refused here
        except (ValueError, OSError, EOFError) as exc:
            reason = str(exc).splitlines()[0]
            raise CLIError(
                f"{path} is not a plain numeric .npy array ({reason}); save it with np.save"
            ) from None
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
            kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            raise CLIError(
                f"{path} holds {kind} values, not numbers; save a numeric array with np.save"
            )
        return torch.from_numpy(
            np.asarray(array, dtype=array.dtype.newbyteorder("="))
        )  # torch: native order only
    from ..io.files import load_tensors

    tensors = load_tensors(path)
    if key is None:
        if len(tensors) != 1:
            names = ", ".join(list(tensors)[:5])
            raise CLIError(f"{path} holds {len(tensors)} tensors ({names}); pick one with --key")
        return next(iter(tensors.values()))
    if key not in tensors:
        raise CLIError(f"{path} has no tensor {key!r}; it holds {', '.join(list(tensors)[:8])}")
    return tensors[key]


#: below these sample counts a test or estimate is unreliable: a one-line warning on stderr
MIN_DETECT_SAMPLES = 30  # per side; the two-sample tests have little power below it
MIN_ESTIMATE_REFERENCE, MIN_ESTIMATE_TARGET = (
    100,
    30,
)  # calibration and thresholds need the reference


def warn_few(n_reference: int, n_target: int, minimum: int | tuple[int, int], what: str) -> None:
    low_ref, low_tgt = minimum if isinstance(minimum, tuple) else (minimum, minimum)
    few = [f"{name} has {n} samples (fewer than {low})" for name, n, low in
           (("the reference", n_reference, low_ref), ("the target", n_target, low_tgt)) if n < low]
    if few:
        print(
            f"warning: {' and '.join(few)}; {what} is unreliable on so few; use more data "
            "(--limit, or another --split / --reference-split)",
            file=sys.stderr,
        )


def check_features(ref, tgt, reference: str, target: str):
    """Feature files as (samples, features...) with the same features on both sides; a 1-D array is
    one feature per sample."""
    for t, name in ((ref, reference), (tgt, target)):
        if t.dim() == 0 or len(t) == 0:
            raise CLIError(
                f"{name} holds an array of shape {tuple(t.shape)}; features must be (samples, "
                "features)"
            )
    ref, tgt = (t.reshape(-1, 1) if t.dim() == 1 else t for t in (ref, tgt))
    if ref.shape[1:] != tgt.shape[1:]:
        raise CLIError(
            f"reference and target features differ in shape: {tuple(ref.shape)} vs "
            f"{tuple(tgt.shape)}; compute both with the same model and layer"
        )
    return ref, tgt


def is_feature_file(value: str) -> bool:
    return Path(value).suffix in FEATURE_SUFFIXES


def both_files(reference: str, target: str, model: Optional[str], what: str) -> bool:
    """True when --reference and --target are both ``what`` files (.npy/.safetensors), False when
    both are datasets (which need --model); a one-line error for a mix, or datasets without a
    model."""
    files = [is_feature_file(v) for v in (reference, target)]
    if any(files) and not all(files):
        raise CLIError(
            f"--reference and --target must both be {what} files (.npy/.safetensors) or both "
            "datasets"
        )
    if not all(files) and model is None:
        raise CLIError(
            f"datasets need --model to compute {what}s; or pass .npy/.safetensors {what} files"
        )
    return all(files)


def load_entry(model: str, adapter: Optional[Path], verify: bool = True):
    """The model entry from ``deltatune.models`` (with ``adapter`` loaded when given;
    ``verify=False`` skips its sha256 check)."""
    try:
        from ..models import load_model  # noqa: F401
    except ImportError:
        raise CLIError(
            "deltatune.models is not available in this installation; pass feature files instead"
        ) from None
    if adapter is not None:
        from .train import load_trained

        entry, _ = load_trained(model, adapter, verify=verify)
        return entry
    from ..models import load_model

    entry = load_model(model)
    entry.model.eval()
    return entry


def data_batches(spec: str, entry, split: str, batch_size: int, limit: Optional[int], seed: int = 0,
                 encoding: Optional[str] = None):
    """Batches of dataset ``spec`` (``deltatune.data.load_data``) collated for the model, in
    order."""
    try:
        from ..data import load_data
    except ImportError:
        raise CLIError(
            "deltatune.data is not available in this installation; pass feature files instead"
        ) from None
    from torch.utils.data import DataLoader

    dataset = load_data(spec, split, seed=seed, limit=limit, encoding=encoding)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=entry.collate)


def save_plot(fig, path: Path) -> None:
    from ..io.files import save_figure

    save_figure(fig, path, dpi=110, bbox_inches="tight")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def default_out(job: str) -> Path:
    return Path("runs") / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
