"""Delta algebra: task vectors, merge methods, soups, learned merging, streaming checkpoint merges,
and composition of adapters at inference.

    from deltatune import algebra as alg
    tv = alg.TaskVector.from_adapter(model, "news")                  # ΔW of an attached delta
    merged = alg.merge_task_vectors([tv_a, tv_b], "ties", density=0.5)
    merged.apply_to(model)                                            # fold into the base weights
    alg.merge_checkpoints(alg.load_merge_config("ties.yaml"), "out")  # mergekit-style, streamed

Merge methods are pure tensor functions registered with :func:`merge_method`; see
:func:`merge_methods` for the list and docs/merging.md for the guide.
"""

from .checkpoint import Checkpoint, ShardWriter
from .compose import WeightedSum, attach_lowrank, hot_swap, merge_adapters, weighted
from .config import MergeConfig, ModelEntry, load_merge_config, parse_merge_config
from .errors import CheckpointError, MergeConfigError, MergeError
from .fusion import AdapterFusion, LoRAMixture
from .geometric import model_stock, slerp
from .learned import LearnedMerge, block_of, entropy, learn_merge_coefficients
from .lowrank import LowRank, concat_lora, svd_lora
from .methods import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    generalized_task_arithmetic,
    linear,
    task_arithmetic,
    ties,
)
from .registry import MERGE_METHODS, MergeMethod, get_method, merge_method, merge_methods
from .soups import (
    SoupResult,
    greedy_soup,
    loaded,
    merge_state_dicts,
    plot_wise_ft,
    uniform_soup,
    wise_ft,
    wise_ft_sweep,
)
from .sparsify import elect_signs, fit_sparsifier
from .statistical import diagonal_fisher, fisher, gram_matrices, regmean
from .streaming import merge_checkpoints, plan_merge
from .task_vector import TaskVector, merge_task_vectors

__all__ = [
    "MERGE_METHODS",
    "AdapterFusion",
    "Checkpoint",
    "CheckpointError",
    "LearnedMerge",
    "LoRAMixture",
    "LowRank",
    "MergeConfig",
    "MergeConfigError",
    "MergeError",
    "MergeMethod",
    "ModelEntry",
    "ShardWriter",
    "SoupResult",
    "TaskVector",
    "WeightedSum",
    "attach_lowrank",
    "block_of",
    "breadcrumbs",
    "breadcrumbs_ties",
    "concat_lora",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "diagonal_fisher",
    "elect_signs",
    "entropy",
    "fisher",
    "fit_sparsifier",
    "generalized_task_arithmetic",
    "get_method",
    "gram_matrices",
    "greedy_soup",
    "hot_swap",
    "learn_merge_coefficients",
    "linear",
    "load_merge_config",
    "loaded",
    "merge_adapters",
    "merge_checkpoints",
    "merge_method",
    "merge_methods",
    "merge_state_dicts",
    "merge_task_vectors",
    "model_stock",
    "parse_merge_config",
    "plan_merge",
    "plot_wise_ft",
    "regmean",
    "slerp",
    "svd_lora",
    "task_arithmetic",
    "ties",
    "uniform_soup",
    "weighted",
    "wise_ft",
    "wise_ft_sweep",
]
