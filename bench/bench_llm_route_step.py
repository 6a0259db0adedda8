"""One decode step of SmolLM2-135M at batch 32 on 8 LoRA adapters, routed vs one adapter, timed in
pairs (issue 20). On a loaded shared machine whole generations drift with the load; alternating
single steps (3 forwards each, order flipped every pair) and taking the median of the paired
ratios keeps both sides under the same load.

    .venv/bin/python bench/bench_llm_route_step.py 30     # 30 pairs, 1 torch thread
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(pairs: int) -> None:
    from bench_llm_generate import QUESTIONS, make_adapters
    from transformers import DynamicCache

    from deltatune.lm.generate import causal_lm, encode, left_pad, prompt_text, routed
    from deltatune.models import load_model

    torch.set_num_threads(1)
    entry = load_model("smollm2")
    tok = entry.collate.tokenizer
    lm = causal_lm(entry.model.eval())
    names = make_adapters(lm, 8, 8)
    rows = [encode(tok, prompt_text(tok, QUESTIONS[i % 16])) for i in range(32)]
    ids, mask = left_pad(rows, tok.pad_token_id)
    ways = {"routed": [names[i // 4] for i in range(32)], "one": [names[0]] * 32}
    times: dict[str, list[float]] = {k: [] for k in ways}
    with torch.inference_mode():
        caches = {}
        for k, route in ways.items():  # the prompts read once per way
            caches[k] = DynamicCache(config=lm.config)
            with routed(lm, route):
                lm(input_ids=ids, attention_mask=mask, past_key_values=caches[k], use_cache=True,
                   logits_to_keep=1)
        mask1 = torch.cat([mask, torch.ones(32, 1, dtype=mask.dtype)], 1)
        step = torch.full((32, 1), 42)
        for r in range(pairs):
            for k in ("routed", "one") if r % 2 == 0 else ("one", "routed"):
                with routed(lm, ways[k]):
                    t = time.perf_counter()
                    for _ in range(3):
                        lm(input_ids=step, attention_mask=mask1, past_key_values=caches[k],
                           use_cache=True, logits_to_keep=1)
                        caches[k].crop(-1)  # the same step again
                    times[k].append(time.perf_counter() - t)
    ratio = [o / r for o, r in zip(times["one"], times["routed"])]
    print("median s per 3 steps:", {k: round(statistics.median(v), 3) for k, v in times.items()})
    print(f"routed / one adapter (speed), median of {len(ratio)} paired ratios: "
          f"{statistics.median(ratio):.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
