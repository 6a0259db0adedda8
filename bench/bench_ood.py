"""Per-input OOD scores (issue 23): AUROC of msp / energy / mahalanobis / knn / vim on real shifts.

    .venv/bin/python bench/bench_ood.py              # full: writes its part of bench/RESULTS.md
    .venv/bin/python bench/bench_ood.py --no-write   # print only
    .venv/bin/python bench/bench_ood.py --skip-text  # MNIST pairs only

Pairs (in-distribution vs out-of-distribution, each scored by the model trained on the first):

- MNIST (the max-pooling BatchNorm CNN of bench_tta.py, 2 epochs) vs MNIST-C, each of the 15
  corruptions at severity 5 (near shifts: same digits), and vs sklearn's digits drawn at MNIST size
  (a far shift: another data set). ID = 1,000 clean test images, OOD = the same images corrupted.
- MiniLM fine-tuned on airlines tweets (the model of bench_tta_text.py) vs the apple, cars and nfl
  tweet domains (near: same medium, other topics) and vs BBC News articles (far).

Scorers are fitted on training data with its labels (the reference of Lee et al. and Sun et al.):
10,000 MNIST training images; ``--text-reference`` of the airlines training tweets. The models and
the corrupted images come from the caches of bench_tta.py / bench_tta_text.py (trained if absent);
features and logits are cached here (``--cache``, safetensors), so reruns take seconds.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared machine: no spinning OpenMP threads

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import deltatune.deploy as dd  # noqa: E402
from deltatune.deploy.ood import head_of, represent  # noqa: E402

METHODS = ("msp", "energy", "mahalanobis", "knn", "vim")
FAR = ("digits", "bbc")  # the far-shift pairs of the aim (best method >= 0.90 AUROC)
NEEDS = ("features", "logits")


def cached(cache: Path, name: str, compute) -> dict[str, torch.Tensor]:
    """``compute()`` → {features, logits[, labels]}, cached as safetensors under ``name``."""
    from safetensors.torch import load_file, save_file

    path = cache / f"{name}.safetensors"
    if path.exists():
        return load_file(str(path))
    t0 = time.time()
    out = {k: v.contiguous() for k, v in compute().items()}
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp))
    os.replace(tmp, path)
    print(f"  {name}: {len(out['features'])} rows ({time.time() - t0:.0f}s)", flush=True)
    return out


def reps(model, data, layer: str) -> dict[str, torch.Tensor]:
    f, z = represent(model, data, NEEDS, layer=layer, batch_size=128)
    return {"features": f.float(), "logits": z.float()}


# --- MNIST ----------------------------------------------------------------------------------------
def mnist_sets(args) -> tuple[dict, tuple, dict]:
    """(reference, head, {name: representations}) for the MNIST pairs."""
    import bench_tta as bt

    data = bt.load_mnist()
    model = bt.trained_model(data, args.tta_cache, 2, arch="maxpool")
    layer = "classifier"
    test_x = data["test"][0]
    perm = np.random.RandomState(0).permutation(len(test_x))  # bench_tta.py's split
    idx = perm[:1000]
    sets = {"mnist": cached(args.cache, "mnist_test1000",
                            lambda: reps(model, bt.pixels(test_x[idx]), layer))}
    for c in bt.CORRUPTIONS:
        sets[c] = cached(args.cache, f"mnistc_{c}_s5", lambda c=c: reps(model, bt.pixels(
            bt.corrupted(test_x[idx], idx, c, 5, args.tta_cache, "dtdata-perm0n1000")), layer))
    from deltatune.data.images import digits_arrays

    sets["digits"] = cached(args.cache, "digits_all", lambda: reps(
        model, bt.pixels(np.asarray(digits_arrays()[0])), layer))
    train_x, train_y = data["train"]

    def reference():
        r = reps(model, bt.pixels(train_x[:10000]), layer)
        return {**r, "labels": torch.from_numpy(train_y[:10000])}

    ref = cached(args.cache, "mnist_train10000", reference)
    # val/test-pool features for bench_drift.py: clean reference and clean streams
    return ref, head_of(model, layer), sets


# --- text -----------------------------------------------------------------------------------------
def text_sets(args) -> tuple[dict, tuple, dict]:
    import bench_tta_text as bx

    from deltatune.data import load_data

    a_train = load_data("tweet-sentiment:airlines", "train", seed=0).examples
    order = list(range(len(a_train)))
    random.Random(0).shuffle(order)
    train = [a_train[i] for i in sorted(order[:4000])]  # bench_tta_text.py's training tweets
    val = load_data("tweet-sentiment:airlines", "val", seed=0).examples
    test = load_data("tweet-sentiment:airlines", "test", seed=0).examples
    ns = argparse.Namespace(cache=ROOT / ".cache" / "bench_tta_text", epochs=1, lr=5e-5)
    entry, _ = bx.trained_model(train, val, ns)
    model, collate, layer = entry.model, entry.collate, "classifier"

    def run(examples):
        out = reps(model, bx.batches(collate, examples), layer)
        return {**out, "labels": torch.tensor([e["label"] for e in examples])}

    n = args.text_limit
    sets = {"airlines": cached(args.cache, f"airlines_test{n}",
                               lambda: run(random.Random(1).sample(test, min(n, len(test)))))}
    for d in ("apple", "cars", "nfl"):
        sets[d] = cached(args.cache, f"{d}_{n}", lambda d=d: run(bx.domain_pool(d)[:n]))

    def bbc():
        rows = load_data("bbc-news", "test", seed=0).examples
        rows = random.Random(2).sample(rows, min(n, len(rows)))
        return run([{"text": r["text"], "label": 0} for r in rows])  # labels unused

    sets["bbc"] = cached(args.cache, f"bbc_{n}", bbc)
    k = args.text_reference
    picked = random.Random(3).sample(train, k)

    ref = cached(args.cache, f"airlines_train{k}", lambda: run(picked))
    if getattr(args, "drift", False):  # the streams of bench_drift.py
        sets["val"] = cached(args.cache, "airlines_val", lambda: run(val))
        pool = [a_train[i] for i in order[4000 : 4000 + args.clean_pool]]  # never trained on
        sets["pool"] = cached(args.cache, f"airlines_pool{args.clean_pool}", lambda: run(pool))
    return ref, head_of(model, layer), sets


# --- scoring --------------------------------------------------------------------------------------
def aurocs(ref: dict, head: tuple, sets: dict, id_name: str) -> dict[str, dict[str, float]]:
    """AUROC of every method for ``id_name`` vs every other set."""
    out: dict[str, dict[str, float]] = {}
    for m in METHODS:
        scorer = dd.OODScorer.fit_representations(
            m, features=ref["features"], logits=ref["logits"], labels=ref["labels"], head=head)
        s = {name: scorer.score_representations(r["features"], r["logits"])
             for name, r in sets.items()}
        out[m] = {name: dd.auroc(s[id_name], v) for name, v in s.items() if name != id_name}
    return out


def table(rows: dict[str, dict[str, float]], names: list[str], short: dict[str, str]) -> str:
    head = "| method | " + " | ".join(short.get(n, n) for n in names) + " | mean |"
    lines = [head, "|---|" + "---|" * (len(names) + 1)]
    best = {n: max(rows[m][n] for m in rows) for n in names}
    for m, r in rows.items():
        cells = [f"**{r[n]:.3f}**" if r[n] == best[n] else f"{r[n]:.3f}" for n in names]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {np.mean([r[n] for n in names]):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench_ood")
    ap.add_argument("--tta-cache", type=Path,
                    default=Path(tempfile.gettempdir()) / "deltatune-bench-tta")
    ap.add_argument("--text-limit", type=int, default=500, help="texts per domain and of BBC")
    ap.add_argument("--text-reference", type=int, default=2000,
                    help="airlines training tweets the scorers are fitted on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    args.tta_cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fresh = not any(args.cache.glob("*.safetensors"))
    cache_note = ("; features computed and cached in this run" if fresh else
                  "; features and logits read from the cache of an earlier run, where computing "
                  "them took about 7 min")
    print("MNIST", flush=True)
    import bench_tta as bt

    ref, head, sets = mnist_sets(args)
    mnist = aurocs(ref, head, sets, "mnist")
    names = [*bt.CORRUPTIONS, "digits"]
    body = [table(mnist, names, {**bt.SHORT, "digits": "**digits (far)**"})]
    print(body[0], flush=True)
    text = None
    if not args.skip_text:
        print("text", flush=True)
        ref, head, sets = text_sets(args)
        text = aurocs(ref, head, sets, "airlines")
        body.append(table(text, ["apple", "cars", "nfl", "bbc"], {"bbc": "**BBC (far)**"}))
        print(body[1], flush=True)
    minutes = (time.time() - t0) / 60
    far = {p: max(r[p] for r in res.values()) for res in (mnist, text) if res
           for p in FAR if p in next(iter(res.values()))}
    report = "\n".join([
        f"Command: `.venv/bin/python bench/bench_ood.py{' --skip-text' if args.skip_text else ''}`"
        f" ({minutes:.1f} min on {args.threads} CPU threads of the shared machine{cache_note}). "
        "AUROC of telling the out-of-distribution set from "
        "the in-distribution one by each per-input score (1.0 = perfectly separated, 0.5 = "
        "chance; **bold** = best per column). Scorers fitted on training data with labels: "
        "10,000 MNIST training images / "
        f"{args.text_reference} airlines training tweets; knn k = 10 on L2-normalised features; "
        "vim with the principal subspace of half the feature width (64 of 128 / 192 of 384).",
        "",
        "**MNIST (1,000 clean test images) vs MNIST-C severity 5 (the same images corrupted) and "
        "vs sklearn digits (1,797, drawn at MNIST size)**, max-pooling BatchNorm CNN of "
        "bench_tta.py:",
        "",
        body[0],
    ])
    if text:
        report += "\n\n" + "\n".join([
            f"**Airlines tweets ({args.text_limit} test tweets) vs the other tweet domains "
            f"({args.text_limit} each) and BBC News ({args.text_limit} test articles)**, MiniLM "
            "fine-tuned on airlines (bench_tta_text.py):",
            "",
            body[1],
        ])
    report += "\n\nBest AUROC on the far-shift pairs (aim: >= 0.90): " + ", ".join(
        f"{p} {v:.3f}" for p, v in far.items()) + "."
    print(report)
    if not args.no_write:
        write_part(args.cache, "ood", report)


SECTION = "OOD scores and stream monitors (issue 23)"
PARTS = {"ood": "### Per-input OOD scores", "drift": "### Stream monitors and label shift"}


def write_part(cache: Path, part: str, text: str) -> None:
    """Keep this benchmark's part in ``cache`` and write the section of RESULTS.md from every
    part measured so far (bench_ood.py and bench_drift.py share one section)."""
    from _results import write_section

    (cache / f"{part}_part.md").write_text(text)
    body = [f"{PARTS[p]}\n\n{(cache / f'{p}_part.md').read_text().strip()}"
            for p in PARTS if (cache / f"{p}_part.md").exists()]
    write_section(SECTION, "\n\n".join(body))
    print(f"written to bench/RESULTS.md ({SECTION})")


if __name__ == "__main__":
    main()
