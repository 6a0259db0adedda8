"""Delta compression benchmark (issue 7): every codec on a full fine-tuning delta and a LoRA delta
of MiniLM trained on BBC News: file size vs the float32 delta, and test accuracy retained.

    # as in RESULTS.md (trains twice on the first run)
    .venv/bin/python bench/bench_compress.py
    # longer training (new cache entries)
    .venv/bin/python bench/bench_compress.py --epochs 2

Training: MiniLM (128 tokens), one epoch over the BBC News training split, seed 0; LoRA r=8 on
query,value (lr 1e-3) and full fine-tuning (lr 5e-5), the new classification head trained in both.
The trained deltas are cached as safetensors in `.cache/bench_compress/`, so reruns only compress
and evaluate. The head is kept uncompressed (`keep=("classifier",)`: a new head is not a delta of
the base); vectors (biases, LayerNorm) stay raw as in BitDelta. Ratio = float32 bytes of the whole
delta / bytes of the packed container. Accuracy retained = compressed test accuracy / uncompressed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
CACHE = ROOT / ".cache" / "bench_compress"

CODECS = [
    ("compeft", {"density": 0.1}),
    ("compeft+alpha", {"density": 0.1}),
    ("compeft", {"density": 0.05}),
    ("compeft", {"density": 0.25}),
    ("compeft+alpha", {"density": 0.25}),
    ("bitdelta", {}),
    ("bitdelta+calibrated", {}),
    ("dare", {"density": 0.1}),
    ("int8", {}),
    ("int4", {}),
    ("lowrank", {"rank": 16}),
    ("lowrank", {"rank": 64}),
]


def _model():
    import torch

    from deltatune.models import load_model

    torch.manual_seed(0)  # the same new head every time: the full delta is relative to it
    return load_model("minilm", num_labels=5, max_length=128)


def train(kind: str, epochs: int, limit: int | None = None):
    """The trained delta (cached): an adapter dir for LoRA, (base, fine-tuned) state files for
    full."""
    import deltatune as dt
    from deltatune.data import load_data
    from deltatune.io import save_tensors
    from deltatune.train import TrainConfig, fit

    out = CACHE / f"{kind}-e{epochs}" if limit is None else CACHE / f"{kind}-e{epochs}-n{limit}"
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    entry = _model()
    base = {k: v.clone() for k, v in entry.model.state_dict().items()}
    if kind == "lora":
        dt.attach(
            entry.model,
            dt.LoRA(r=8, alpha=16, targets=["query", "value"], trainable_modules=["classifier"]),
        )
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=16,
        lr=1e-3 if kind == "lora" else 5e-5,
        seed=0,
        progress=False,
        eval_each_epoch=False,
        keep_best=False,
    )
    fit(
        entry.model,
        load_data("bbc-news", "train", limit=limit),
        entry.collate,
        cfg,
        task=entry.task,
    )
    if kind == "lora":
        dt.save_adapter(entry.model, out / "adapter")
    else:
        save_tensors(out / "base.safetensors", base)
        save_tensors(out / "finetuned.safetensors", entry.model.state_dict())
    (out / "done").write_text("ok\n")
    return out


def accuracy(model, entry, data) -> float:
    from deltatune.train import evaluate

    return evaluate(model, data, entry.collate, task=entry.task)["accuracy"]


def score(c, kind: str, data) -> float:
    """Accuracy of the compressed delta ``c`` saved, reloaded and applied to a fresh base."""
    import tempfile

    import deltatune as dt
    from deltatune import compress as dc

    with tempfile.TemporaryDirectory() as tmp:
        c.save(tmp)
        model = _model()
        if kind == "lora":
            dt.load_adapter(model.model, tmp)
        else:
            dc.load_compressed(tmp).to_task_vector().apply_to(model.model)
        return accuracy(model.model, model, data)


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument(
        "--calibration-steps", type=int, default=30, help="BitDelta scale distillation steps"
    )
    ap.add_argument("--train-limit", type=int, default=None, help="training articles (smoke runs)")
    ap.add_argument("--test-limit", type=int, default=None, help="test articles (smoke runs)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import torch

    import deltatune as dt
    from deltatune import compress as dc
    from deltatune.data import load_data
    from deltatune.io import load_tensors

    test = load_data("bbc-news", "test", limit=args.test_limit)
    val = load_data("bbc-news", "val", limit=args.test_limit)
    calib = load_data("bbc-news", "train", limit=64)
    rows: list[tuple[str, str, float, float, float]] = []
    t0 = time.time()
    for kind in ("full", "lora"):
        src = train(kind, args.epochs, args.train_limit)
        entry = _model()
        if kind == "lora":
            dt.load_adapter(entry.model, src / "adapter")
        else:
            entry.model.load_state_dict(load_tensors(src / "finetuned.safetensors"))
        ref = accuracy(entry.model, entry, test)
        teacher_model = entry.model.eval()
        batches = [
            entry.collate([calib[i] for i in range(j, j + 16)]) for j in range(0, len(calib), 16)
        ]
        for b in batches:
            b.pop("labels", None)
        for codec, opts in CODECS:
            name = codec.split("+")[0]
            if kind == "lora" and name == "lowrank":
                continue  # LoRA factors are low-rank already (the codec refuses them)
            if kind == "lora":
                c = dc.compress_adapter(src / "adapter", name, keep=("classifier",), **opts)
            else:
                c = dc.compress_checkpoint(
                    src / "finetuned.safetensors",
                    src / "base.safetensors",
                    name,
                    keep=("classifier",),
                    **opts,
                )
            if codec.endswith("+calibrated"):
                if kind == "lora":
                    # BitDelta calibrates the scales of full weight deltas (the paper's setting)
                    continue
                base_model = _model().model
                base_sd = dict(base_model.state_dict())
                with torch.no_grad():
                    targets = {id(b): teacher_model(**b) for b in batches}
                c = dc.calibrate_scales(
                    c,
                    base_model,
                    base_sd,
                    teacher=lambda b: targets[id(b)],
                    batches=batches,
                    steps=args.calibration_steps,
                    lr=1e-4,
                )
            if codec.endswith("+alpha"):  # ComPEFT's scale search, on the validation split
                c, scores = dc.search_alpha(
                    c, lambda cd: score(cd, kind, val), grid=(0.5, 1.0, 1.5, 2.0, 3.0)
                )
                print("alpha search (val accuracy):", scores, flush=True)
            acc = score(c, kind, test)
            label = codec + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")
            rows.append((kind, label, c.ratio, acc, acc / ref))
            print(
                kind,
                label,
                f"ratio {c.ratio:.1f}x acc {acc:.4f} retained {acc / ref:.4f}",
                flush=True,
            )
        rows.append((kind, "uncompressed float32", 1.0, ref, 1.0))
    lines = [
        "| delta | codec | size ratio vs fp32 | test accuracy % | accuracy retained | aim |",
        "|---|---|---|---|---|---|",
    ]
    aims = {"compeft (density=0.1)": "≥ 8x, ≥ 99%", "compeft+alpha (density=0.1)": "≥ 8x, ≥ 99%",
            "compeft (density=0.25)": "≥ 8x, ≥ 99%", "compeft+alpha (density=0.25)": "≥ 8x, ≥ 99%",
            "bitdelta": "≥ 16x, ≥ 97%", "bitdelta+calibrated": "≥ 16x, ≥ 97%"}
    for kind, label, ratio, acc, kept in rows:
        lines.append(
            f"| {'full fine-tuning' if kind == 'full' else 'LoRA r=8'} | {label} | {ratio:.1f}x | "
            f"{100 * acc:.2f} | {100 * kept:.1f}% | {aims.get(label, '')} |"
        )
    cmd = "`.venv/bin/python bench/bench_compress.py" + "".join(" " + a for a in sys.argv[1:]) + "`"
    body = (
        f"Command: {cmd} (MiniLM on BBC News, {args.epochs} epoch(s), seed 0, {len(test)} test "
        f"articles; {time.time() - t0:.0f} s after training). "
        + __doc__.split("Training:")[1].strip().replace("\n", " ")
        + f" BitDelta calibration: {args.calibration_steps} Adam steps distilling the logits of "
        "the uncompressed model on 64 training articles (only the per-matrix scales move). "
        "`compeft+alpha`: the scale multiplier picked from 0.5-3 by validation "
        "accuracy.\n\n" + "\n".join(lines)
    )
    print(body)
    if not args.no_write:
        from _results import write_section

        write_section("Delta compression (issue 7)", body)


if __name__ == "__main__":
    main()
