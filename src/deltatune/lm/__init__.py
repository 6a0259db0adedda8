"""Language models: chat and preference data, instruction (SFT) and preference (DPO) tuning,
KV-cached generation with many adapters in one batch, and evaluation by what the model says.

The pieces meet on plain dicts and tensors:

* **Examples** (items of :class:`deltatune.data.Dataset`): ``task="chat"``:
  ``{"messages": [{"role", "content"}, ...], "answer"?: str, "label"?: int}``;
  ``task="preference"``: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``
  (``chosen``/``rejected`` hold the assistant turn(s) that follow the prompt);
  ``task="text"``: ``{"text": str}`` (continued pretraining).
* **Batches** (what the collates of :mod:`deltatune.lm.tokenize` return): ``input_ids``,
  ``attention_mask`` and ``labels`` (B, T), labels aligned with the inputs (the loss shifts them)
  and -100 wherever no loss is taken (system/user turns, padding). A packed batch adds
  ``position_ids`` (restarting at 0 in each example) and ``segment_ids`` (1, 2, ... per example in
  the row, 0 for padding); attention never crosses a segment. A preference batch stacks the chosen
  rows ``[0, B)`` over the rejected rows ``[B, 2B)``.
* **Models**: the causal-LM entry's model returns logits from ``model(**batch)`` and offers
  ``hidden(**batch)`` and ``head`` so losses can be computed in chunks without the whole batch's
  logits (:mod:`deltatune.lm.loss`).
"""
