"""What ``deltatune train`` adds for causal language models: the objective that fits the data
(sft on chat/text, dpo on preference pairs), the chat or preference collate, the defaults (batch 8,
256 tokens, evaluation batch 16) and starting from an existing adapter (``--from-adapter``; DPO
after SFT). Everything here runs before ``--out`` is created, so a bad combination leaves nothing
behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from .common import CLIError

#: causal-LM defaults where the user gives none (classification keeps TrainConfig's)
LM_BATCH_SIZE = 8
#: evaluation batch: 16 x 256 tokens hold about a quarter of the activations of TrainConfig's 64
#: (SmolLM2: the attention scores and MLP of 64 x 256 tokens add ~0.95 GB to the process), at the
#: same time per example on a CPU, whose matmuls are already large at 16 rows of 256 tokens
LM_EVAL_BATCH_SIZE = 16
LM_MAX_LENGTH = 256
#: gradient checkpointing, as trl's SFTConfig/DPOConfig default: SmolLM2's step at 8 x 256 peaks at
#: 1.9 GB instead of 3.7-4.2 GB, for about 30% more time per step (--no-gradient-checkpointing)
LM_GRADIENT_CHECKPOINTING = True
_LM_DATA = ("chat", "text", "preference")


def resolve_objective(entry: Any, data_task: str, objective: Optional[str], data: str) -> str:
    """The objective to train with: ``sft``/``dpo`` for a causal LM (``auto``: dpo on preference
    data, sft otherwise), ``auto`` for a classifier; a combination that cannot train is refused."""
    objective = objective or "auto"
    if objective not in ("auto", "sft", "dpo"):
        raise CLIError(f"--objective {objective!r}: use sft or dpo")
    if entry.task != "causal-lm":
        if objective != "auto":
            raise CLIError(
                f"--objective {objective} trains causal language models; {entry.name} is a "
                f"{entry.task} model (drop --objective, or pick a causal LM such as smollm2)"
            )
        return objective
    preference = data_task == "preference"
    if objective == "dpo" and not preference:
        raise CLIError(
            f"--objective dpo needs preference data (prompt, chosen, rejected); {data} holds "
            f"{data_task} examples: use a preference set (e.g. bbc-news-pref) or a file with "
            "prompt,chosen,rejected columns"
        )
    if objective == "sft" and preference:
        raise CLIError(
            f"--objective sft trains on chat or text data; {data} holds preference pairs: use "
            "--objective dpo, or chat data"
        )
    return "dpo" if preference else "sft"


def lm_collate(entry: Any, data_task: str, *, max_length: Optional[int],
               template_file: Optional[str], packing: bool) -> Callable:
    """The collate of a causal LM for ``data_task``: chat/text → chat_collate (loss on the
    assistant's tokens, or every token of a text), preference → preference_collate; other data
    (e.g. a classification CSV's texts) and other models keep the model's own collate."""
    from ..lm.template import check_template, load_template
    from ..lm.tokenize import chat_collate, preference_collate

    if entry.task != "causal-lm" or data_task not in _LM_DATA:
        if template_file or packing:
            raise CLIError(
                "--chat-template and --packing apply to a causal LM on chat, text or preference "
                f"data; this is a {entry.task} model on {data_task or 'other'} data"
            )
        return entry.collate
    tokenizer = getattr(entry.collate, "tokenizer", None)
    if tokenizer is None:
        raise CLIError(f"{entry.name} has no tokenizer to build chat batches with")
    template = load_template(template_file)
    if data_task != "text":
        check_template(tokenizer, template)  # a model without one and no --chat-template
    length = max_length or LM_MAX_LENGTH
    if data_task == "preference":
        if packing:
            raise CLIError("--packing applies to chat and text data, not preference pairs")
        return preference_collate(tokenizer, length, template=template)
    return chat_collate(tokenizer, length, template=template, packing=packing)


def start_from(entry: Any, path: str, objective: str, has_options: bool) -> Optional[Callable]:
    """Load the adapter at ``path`` as the trainable delta ``default``; for DPO also as the frozen
    reference (the policy starts from it and is measured against it, as trl's ``ref`` adapter).
    Returns the reference context for DPO (None otherwise)."""
    import deltatune as dt

    from ..lm.objectives import frozen_reference

    if has_options:
        raise CLIError(
            "--from-adapter continues that adapter's delta: drop --method/--rank/--alpha/"
            "--dropout/--targets/--opt (they describe a new one)"
        )
    if not Path(path).is_dir():
        raise CLIError(f"--from-adapter {path} is not an adapter directory")
    dt.load_adapter(entry.model, path, name="default")  # loaded trainable, active
    return frozen_reference(entry.model, path) if objective == "dpo" else None
