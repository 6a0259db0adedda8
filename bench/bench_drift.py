"""Stream monitors and label shift (issue 23): online MMD / LSDD run-times on clean streams against
the configured ERT, detection delays, the offline tests, mmd_rff at 100k samples, BBSE / RLLS / EM.

    .venv/bin/python bench/bench_drift.py              # writes its part of bench/RESULTS.md
    .venv/bin/python bench/bench_drift.py --no-write   # print only

Features come from bench_ood.py's cache (the same models: the MNIST CNN of bench_tta.py, the
airlines MiniLM of bench_tta_text.py). Streams:

- MNIST: reference = 2,000 clean test images, clean streams drawn from the other 7,000 test images
  (disjoint from the reference; both halves of one random split, since MNIST's original train and
  test images come from different writers), drift = the same 1,000 images as bench_tta.py under fog
  at severity 3.
- Tweets: reference = the 1,459 airlines validation tweets, clean streams from
  ``--clean-pool`` airlines training tweets the model never saw, drift = nfl tweets.

For each (data, detector): the threshold is calibrated for ``--ert`` with ``--window``; then
``--streams`` clean streams (random orders of the clean pool, ``10 × ERT`` long) give the measured
run-time to the first false alarm, and ``--streams`` drifted streams (one clean window, then the
drifted data) the detection delay.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_ood as bo  # noqa: E402

import deltatune.deploy as dd  # noqa: E402


def mnist_streams(args) -> dict[str, torch.Tensor]:
    import bench_tta as bt

    data = bt.load_mnist()
    model = bt.trained_model(data, args.tta_cache, 2, arch="maxpool")
    test_x = data["test"][0]
    perm = np.random.RandomState(0).permutation(len(test_x))
    idx = perm[:1000]
    ref = bo.cached(args.cache, "mnist_test_ref2000", lambda: bo.reps(
        model, bt.pixels(test_x[perm[1000:3000]]), "classifier"))
    pool = bo.cached(args.cache, "mnist_test_pool7000", lambda: bo.reps(
        model, bt.pixels(test_x[perm[3000:]]), "classifier"))
    fog = bo.cached(args.cache, "mnistc_fog_s3", lambda: bo.reps(model, bt.pixels(bt.corrupted(
        test_x[idx], idx, "fog", 3, args.tta_cache, "dtdata-perm0n1000")), "classifier"))
    return {"reference": ref["features"], "clean": pool["features"], "drift": fog["features"]}


def tweet_sets(args) -> dict[str, dict[str, torch.Tensor]]:
    args.drift, args.text_reference = True, 2000
    _, _, sets = bo.text_sets(args)
    return sets


def run_monitors(name: str, s: dict[str, torch.Tensor], args) -> list[dict]:
    rows = []
    for kind in ("mmd", "lsdd"):
        t0 = time.time()
        det = dd.online_detector(kind, s["reference"].double(), ert=args.ert, window=args.window,
                                 n_bootstraps=args.bootstraps)
        calib = time.time() - t0
        clean = det.run_times(s["clean"], n_streams=args.streams, length=int(10 * args.ert),
                              seed=1)
        finite = clean[torch.isfinite(clean)]
        delay = det.run_times(s["drift"], n_streams=args.streams, length=int(4 * args.ert),
                              seed=3, prefix=s["clean"]) - args.window
        row = {
            "data": name, "detector": kind, "threshold": det.threshold,
            "simulated_ert": det.calibration["simulated_ert"],
            "clean_mean": float(finite.mean()), "clean_median": float(finite.median()),
            "censored": int(torch.isinf(clean).sum()),
            "delay_mean": float(delay[torch.isfinite(delay)].mean()),
            "delay_median": float(delay.median()), "missed": int(torch.isinf(delay).sum()),
            "calibration_s": calib,
        }
        print(f"  {name} {kind}: {row}", flush=True)
        rows.append(row)
    return rows


def offline_rates(s: dict[str, torch.Tensor], windows: int, size: int) -> dict[str, dict]:
    """Detection rate on drifted windows and false-positive rate on clean windows, per test. Each
    trial draws its own reference (1,000) and clean window, disjoint, from all clean images: with
    one fixed reference the trials would share its sampling error and the rate would be that one
    reference's, not the test's."""
    g = torch.Generator().manual_seed(4)
    clean = torch.cat([s["reference"], s["clean"]]).double()
    out = {}
    for test in ("mmd", "lsdd", "cvm", "ks", "mmd_rff", "classifier"):
        t0 = time.time()
        hits = {"clean": 0, "drift": 0}
        for i in range(windows):
            perm = torch.randperm(len(clean), generator=g)
            ref, window = clean[perm[:1000]], clean[perm[1000 : 1000 + size]]
            drift = s["drift"][torch.randperm(len(s["drift"]), generator=g)[:size]].double()
            hits["clean"] += dd.detect(ref, window, test, seed=i).drift
            hits["drift"] += dd.detect(ref, drift, test, seed=i).drift
        out[test] = {k: 100.0 * v / windows for k, v in hits.items()}
        out[test]["seconds"] = (time.time() - t0) / (2 * windows)
        print(f"  {test}: {out[test]}", flush=True)
    return out


RFF_PROBE = """
import json, sys, time, torch
import deltatune.deploy as dd

def status(key):  # kB from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
n, d = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
ref = torch.randn(n, d, generator=g)
window, moved = torch.randn(1000, d, generator=g), torch.randn(1000, d, generator=g) + 0.1
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:  # restart the peak (VmHWM) from here
    fh.write("5")
t0 = time.time()
same = dd.detect(ref, window, "mmd_rff", max_samples=None)
shifted = dd.detect(ref, moved, "mmd_rff", max_samples=None)
print(json.dumps({"seconds": (time.time() - t0) / 2, "p_same": same.p_value,
                  "p_moved": shifted.p_value, "n_reference": same.n_reference,
                  "rss_before_mb": before, "peak_rss_mb": status("VmHWM")}))
"""


def rff_probe(n: int, d: int) -> dict:
    """mmd_rff on ``n`` reference samples in a fresh process (its peak RSS is the test's)."""
    res = subprocess.run([sys.executable, "-c", RFF_PROBE, str(n), str(d)], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return json.loads(res.stdout.strip().splitlines()[-1])


def resampled(target: dict[str, torch.Tensor], prior: torch.Tensor, n: int = 1000,
              seed: int = 5) -> dict[str, torch.Tensor]:
    """``n`` rows of ``target`` drawn (with replacement) so that the labels follow ``prior``: a
    pure label shift, the case BBSE and RLLS are made for (p(x|y) unchanged)."""
    g = torch.Generator().manual_seed(seed)
    y = target["labels"]
    labels = torch.multinomial(prior.float(), n, replacement=True, generator=g)
    rows = torch.stack([(y == c).nonzero()[torch.randint(int((y == c).sum()), (1,), generator=g)]
                        .squeeze() for c in labels.tolist()])
    return {k: v[rows] for k, v in target.items()}


def label_shift(sets: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict]:
    val = sets["val"]
    rows = {}
    targets = {d: sets[d] for d in ("airlines", "apple", "cars", "nfl")}
    for d in ("cars", "nfl"):  # airlines tweets with another domain's label prior
        prior = torch.bincount(sets[d]["labels"], minlength=3).double()
        targets[f"airlines, {d} prior"] = resampled(sets["airlines"], prior / prior.sum())
    for domain, target in targets.items():
        y = target["labels"]
        truth = torch.bincount(y, minlength=3).double() / len(y)
        row = {"true": truth.tolist(),
               "accuracy_source": float((target["logits"].argmax(-1) == y).double().mean())}
        for m in ("em", "bbse", "rlls"):
            est = dd.estimate_label_shift(val["logits"], val["labels"], target["logits"], m)
            row[m] = {"prior": est.prior.tolist(),
                      "l1": float((est.prior - truth).abs().sum()),
                      "accuracy": float((est.correct(target["logits"]).argmax(-1) == y)
                                        .double().mean())}
        rows[domain] = row
        print(f"  {domain}: " + ", ".join(f"{m} L1 {row[m]['l1']:.3f} acc "
                                          f"{100 * row[m]['accuracy']:.1f}"
                                          for m in ("em", "bbse", "rlls")), flush=True)
    return rows


def report(args, monitors, offline, rff, shifts, minutes) -> str:
    cmd = "`.venv/bin/python bench/bench_drift.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a != "--no-write") + "`"
    out = [
        f"Command: {cmd} ({minutes:.1f} min on {args.threads} CPU threads of the shared machine; "
        "features from bench_ood.py's cache). Online detectors calibrated for ERT "
        f"{args.ert:g} with a window of {args.window}, {args.bootstraps} simulated streams from "
        "half of the reference; then measured on data the calibration never saw: "
        f"{args.streams} clean streams (random orders of the clean pool, {10 * args.ert:g} "
        f"samples long) and {args.streams} drifted streams (each: its own random clean window, "
        "then the shifted data; delay = samples after the change until the first alarm). "
        "MNIST: reference 2,000 clean test images, clean pool the other 7,000, drift = fog "
        "severity 3 (the 1,000 images of bench_tta.py). Tweets: reference the 1,459 airlines "
        f"validation tweets, clean pool {args.clean_pool} unseen airlines training tweets, drift "
        "= nfl tweets.",
        "",
        "| data | detector | simulated ERT | clean run-time: mean (median) | vs ERT | censored "
        "| delay after the change: mean (median) | missed | calibration (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in monitors:
        out.append(
            f"| {r['data']} | {r['detector']} | {r['simulated_ert']:.0f} | {r['clean_mean']:.0f} "
            f"({r['clean_median']:.0f}) | {100 * (r['clean_mean'] / args.ert - 1):+.0f}% | "
            f"{r['censored']} | {r['delay_mean']:.1f} ({r['delay_median']:.0f}) | {r['missed']} "
            f"| {r['calibration_s']:.1f} |")
    out += [
        "",
        "Aim: clean run-time within ±25% of the ERT over >= 50 streams — "
        + ", ".join(f"{r['data']}/{r['detector']} "
                    f"{'met' if abs(r['clean_mean'] / args.ert - 1) <= 0.25 else 'missed'}"
                    for r in monitors) + ".",
        "",
        f"**Offline tests on MNIST features** ({args.windows} trials, each with its own random "
        f"reference of 1,000 clean test images and a disjoint window of {args.window_size} clean "
        "or fog:3 images; alpha 0.05): detection rate on fog:3 windows and false-positive rate on "
        "clean windows (%), seconds per test:",
        "",
        "| test | fog:3 detected | clean flagged | s / test |",
        "|---|---|---|---|",
    ]
    for t, r in offline.items():
        out.append(f"| {t} | {r['drift']:.0f} | {r['clean']:.0f} | {r['seconds']:.2f} |")
    out += [
        "",
        f"**mmd_rff on {rff['n_reference']:,} reference samples** (synthetic Gaussian, 128 "
        f"features, `detect(..., max_samples=None)`, fresh process): {rff['seconds']:.1f} s per "
        f"test; the process's peak RSS during the tests {rff['peak_rss_mb']:.0f} MB, of which "
        f"{rff['rss_before_mb']:.0f} MB were held before them (Python, torch, deltatune and the "
        f"data: the tests added {rff['peak_rss_mb'] - rff['rss_before_mb']:.0f} MB); "
        f"p = {rff['p_same']:.2f} for 1,000 "
        f"samples of the same distribution, p = {rff['p_moved']:.2g} for a mean shift of 0.1.",
    ]
    if shifts:
        names = {"em": "EM", "bbse": "BBSE", "rlls": "RLLS"}
        out += [
            "",
            "**Label shift on the tweet domains** (airlines MiniLM; validation = the airlines "
            "validation tweets; targets = 500 tweets of each domain, airlines from its test "
            "split; `airlines, X prior` = 1,000 draws from those airlines test tweets with domain "
            "X's label prior, a pure label shift): L1 distance between the estimated and the true "
            "class prior, and the accuracy (%) of the corrected predictions (source: unadapted).",
            "",
            "| domain | true prior (neg/neu/pos) | EM L1 | BBSE L1 | RLLS L1 | source acc. "
            "| EM acc. | BBSE acc. | RLLS acc. |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d, r in shifts.items():
            out.append(
                f"| {d} | " + "/".join(f"{100 * p:.0f}" for p in r["true"]) + " | "
                + " | ".join(f"{r[m]['l1']:.3f}" for m in names) + f" | "
                f"{100 * r['accuracy_source']:.1f} | "
                + " | ".join(f"{100 * r[m]['accuracy']:.1f}" for m in names) + " |")
        mean = {m: np.mean([r[m]["l1"] for r in shifts.values()]) for m in names}
        out.append("| mean | | " + " | ".join(f"**{mean[m]:.3f}**" for m in names)
                   + " | | | | |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench_ood")
    ap.add_argument("--tta-cache", type=Path,
                    default=Path(tempfile.gettempdir()) / "deltatune-bench-tta")
    ap.add_argument("--ert", type=float, default=500)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--bootstraps", type=int, default=400)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--clean-pool", type=int, default=3000)
    ap.add_argument("--text-limit", type=int, default=500)
    ap.add_argument("--windows", type=int, default=20, help="offline test windows per side")
    ap.add_argument("--window-size", type=int, default=200)
    ap.add_argument("--rff-n", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print("MNIST streams", flush=True)
    m = mnist_streams(args)
    monitors = run_monitors("MNIST -> fog:3", m, args)
    shifts = None
    if not args.skip_text:
        print("tweet streams", flush=True)
        sets = tweet_sets(args)
        t = {"reference": sets["val"]["features"], "clean": sets["pool"]["features"],
             "drift": sets["nfl"]["features"]}
        monitors += run_monitors("airlines -> nfl", t, args)
        print("label shift", flush=True)
        shifts = label_shift(sets)
    print("offline tests", flush=True)
    offline = offline_rates(m, args.windows, args.window_size)
    print("mmd_rff at scale", flush=True)
    rff = rff_probe(args.rff_n, 128)
    print(f"  {rff}", flush=True)
    body = report(args, monitors, offline, rff, shifts, (time.time() - t0) / 60)
    print(body)
    if not args.no_write:
        bo.write_part(args.cache, "drift", body)


if __name__ == "__main__":
    main()
