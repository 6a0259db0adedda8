"""After deployment: notice distribution shift, estimate accuracy without labels, adapt at test
time.

import deltatune.deploy as dd
dd.detect(clean_features, new_features, test="mmd")      # DetectionResult(p_value, drift, ...)
est = dd.fit_accuracy_estimator(val_logits, val_labels)  # temperature scaling + ATC/DoC/COT
est.estimate(new_logits)["atc"]
tta = dd.adapt(model)                                    # "safe" by default; any method by name
preds = tta(x).argmax(-1)
tta.reset()                                              # back to the source model
dd.evaluate_stream(dd.adapt(model, "tent"), loader)      # running error: adapted vs source
"""

from __future__ import annotations

from . import bn, cotta, deyo, entropy, output, rmt, roid, rotta, safe, shot, t3a  # noqa: F401
from .accuracy import AccuracyEstimator, fit_accuracy_estimator, fit_temperature
from .base import (
    METHODS,
    GradientTTA,
    TTAWrapper,
    adapt,
    method_options,
    register_method,
    unwrap,
    wrapper_of,
)
from .batch import softmax_entropy
from .bn import AlphaBN, BNAdapt
from .cotta import CoTTA, image_augment
from .detect import DetectionResult, DriftMonitor, detect, embed
from .deyo import DeYO
from .entropy import EATA, SAR, Tent
from .errors import BatchError, DeployError
from .labelshift import LabelShift, estimate_label_shift
from .norm import BatchNormStats, norm_param_names
from .online import OnlineDetector, OnlineLSDD, OnlineMMD, online_detector
from .ood import SCORES, OODScorer, auroc, fit_ood, ood_scores
from .output import LAME, EMPrior, em_prior, prior_shift_pvalue
from .params import collect_params
from .rmt import RMT
from .roid import ROID
from .rotta import RoTTA
from .safe import Safe
from .shot import SHOT
from .stats import TESTS, adjust_pvalues
from .stream import batch_labels, evaluate_stream
from .t3a import T3A
from .twosample import cvm_test, lsdd_test, mmd_rff_test  # registers lsdd, cvm, mmd_rff

__all__ = [
    "METHODS",
    "TESTS",
    "AccuracyEstimator",
    "AlphaBN",
    "BNAdapt",
    "BatchError",
    "BatchNormStats",
    "CoTTA",
    "DeYO",
    "DeployError",
    "DetectionResult",
    "DriftMonitor",
    "EATA",
    "EMPrior",
    "GradientTTA",
    "LAME",
    "RMT",
    "ROID",
    "RoTTA",
    "SAR",
    "SHOT",
    "Safe",
    "T3A",
    "TTAWrapper",
    "Tent",
    "adapt",
    "adjust_pvalues",
    "batch_labels",
    "collect_params",
    "detect",
    "em_prior",
    "prior_shift_pvalue",
    "embed",
    "evaluate_stream",
    "fit_accuracy_estimator",
    "fit_temperature",
    "image_augment",
    "method_options",
    "norm_param_names",
    "register_method",
    "softmax_entropy",
    "unwrap",
    "wrapper_of",
]
__all__ += [  # per-input OOD scores, online drift detectors, label-shift estimates (issue 23)
    "SCORES",
    "LabelShift",
    "OODScorer",
    "OnlineDetector",
    "OnlineLSDD",
    "OnlineMMD",
    "auroc",
    "cvm_test",
    "estimate_label_shift",
    "fit_ood",
    "lsdd_test",
    "mmd_rff_test",
    "online_detector",
    "ood_scores",
]
