"""Errors of the delta algebra: one line naming the problem and the fix."""

from __future__ import annotations

from ..core.errors import DeltaError


class MergeError(DeltaError):
    """Inputs of a merge do not fit together (shapes, names, dtypes, values) or a parameter is
    bad."""


class CheckpointError(MergeError):
    """A checkpoint path is missing, not safetensors, corrupt, or holds NaN/inf values."""


class MergeConfigError(MergeError):
    """A merge configuration (mergekit-style YAML or dict) is malformed or asks for something
    unknown."""
