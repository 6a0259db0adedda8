"""Errors of the deployment tools; each is a one-line message that names the problem and the fix."""

from __future__ import annotations

from ..core import DeltaError


class DeployError(DeltaError):
    """Bad input to a shift test, an accuracy estimator or a test-time adaptation wrapper."""


class BatchError(DeployError):
    """A test-time batch that cannot be adapted on: empty, too small for batch statistics,
    NaN/inf."""
