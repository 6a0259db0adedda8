"""`deltatune report`: one self-contained HTML file over real run directories of several jobs.

The runs are real CLI runs on the bundled data, kept tiny (the small CNN on MNIST / MNIST-C, a few
optimizer steps); the merge runs on small random checkpoints and the search section is fed a
search's results.json + trials.json as the job writes them (a real search trains MiniLM per trial:
bench/bench_report.py reports over a real one). Checked: the HTML parses, references nothing
outside itself, compares runs of the same job side by side, and renders in headless Chromium.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from deltatune.cli.app import main
from deltatune.train import report_html

CNN = ["--model", "small-cnn"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report_runs")
    train = ["train", *CNN, "--data", "mnist", "--method", "lora", "--limit", "96", "--max-steps",
             "6", "--batch-size", "16", "--targets", "features.0,features.4"]
    calls = {
        "train-r2": [*train, "--rank", "2"],
        "train-r4": [*train, "--rank", "4", "--lr", "3e-3"],
        "eval-fog": ["eval", "--adapter", f"{root}/train-r4/adapter", "--data", "mnist-c:fog:3",
                     "--limit", "64"],
        "compress-int8": ["compress", f"{root}/train-r4/adapter", "--codec", "int8",
                          "--min-numel", "16"],
        "continual": ["continual", *CNN, "--stream", "split-mnist", "--strategy", "replay",
                      "--method", "lora", "--rank", "2", "--max-steps", "2", "--limit", "300",
                      "--limit-test", "100", "--buffer-size", "20"],
        "adapt-tent": ["adapt", *CNN, "--adapter", f"{root}/train-r4/adapter", "--data",
                       "mnist-c:fog:3", "--method", "tent", "--limit", "96", "--batch-size", "32"],
        "detect": ["detect", *CNN, "--reference", "mnist", "--target", "mnist-c:fog:3", "--test",
                   "bbsd", "--window", "50", "--limit", "150"],
    }
    for name, args in calls.items():
        assert main([*args, "--out", str(root / name)]) == 0, name
    _merge_run(root)
    _search_run(root / "search")
    return root


def _merge_run(root: Path) -> None:
    from test_algebra_streaming import make_state, save_ckpt

    base = make_state(0)
    save_ckpt(root / "ckpt" / "base", base)
    for i in (1, 2):
        save_ckpt(root / "ckpt" / f"m{i}", make_state(i, base))
    cfg = {"merge_method": "ties", "base_model": "base",
           "models": [{"model": f"m{i}", "parameters": {"weight": 1.0, "density": 0.5}}
                      for i in (1, 2)]}
    (root / "ckpt" / "ties.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(root / "ckpt" / "ties.yaml"), "--out", str(root / "merge"),
                 "-q"]) == 0


def _search_run(out: Path) -> None:
    """What `deltatune search` writes (results.json, trials.json), with five trials."""
    out.mkdir()
    trials = [{"trial": i, "key": f"lora r={r} @qv", "method": "lora", "params": 9216 * r,
               "val_accuracy": acc, "test_accuracy": acc - 0.02, "steps": 4}
              for i, (r, acc) in enumerate([(1, .55), (2, .61), (4, .60), (8, .66), (16, .64)])]
    pareto = [trials[0], trials[1], trials[3]]
    (out / "trials.json").write_text(json.dumps({"budget": 113571, "trials": trials}))
    (out / "results.json").write_text(json.dumps({
        "job": "search", "model": "minilm", "data": "tweet-sentiment", "budget": 113571,
        "trials_done": 5, "pareto": pareto, "best": trials[3]}))
    (out / "trial_0").mkdir()
    (out / "trial_0" / "results.json").write_text(json.dumps({"job": "search-trial",
                                                              **trials[0]}))


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.ids: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name == "id":
                self.ids.add(value)
            if name in ("src", "href", "xlink:href", "srcset", "action", "poster", "data"):
                self.refs.append((tag, name, value or ""))
            if name == "style" and "url(" in (value or ""):
                self.refs.append((tag, name, value))

    def handle_data(self, data):
        self.text.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def _images(page: _Page) -> list[bytes]:
    return [base64.b64decode(v.split(",", 1)[1]) for t, a, v in page.refs
            if t == "img" and v.startswith("data:image/svg+xml;base64,")]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", str(runs), "--out", str(out), "--title", "test <runs>"]) == 0
    return out


def test_the_report_is_one_self_contained_file(report):
    text = report.read_text(encoding="utf-8")
    page = _parse(text)
    assert page.tags[0] == "html" and "body" in page.tags
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(page.tags)
    assert "@import" not in text and "http://" not in text and "https://" not in text
    assert page.refs, "the report should hold images and anchors"
    for tag, attr, value in page.refs:
        if attr == "href":
            assert value.startswith("#") and value[1:] in page.ids, (tag, value)
        else:
            assert value.startswith("data:image/"), (tag, attr, value[:80])
    assert "<title>test &lt;runs&gt;</title>" in text  # the title is escaped
    # the figures are real images: SVGs drawn by matplotlib, PNGs the runs wrote
    svgs = _images(page)
    assert len(svgs) >= 6 and all(s.lstrip().startswith(b"<?xml") and b"<svg" in s for s in svgs)
    pngs = [v for t, a, v in page.refs if v.startswith("data:image/png;base64,")]
    assert base64.b64decode(pngs[0].split(",", 1)[1]).startswith(b"\x89PNG")


def test_each_job_gets_its_section_and_runs_are_compared_within_it(report):
    text = report.read_text(encoding="utf-8")
    page = _parse(text)
    for job in ("train", "eval", "compress", "merge", "continual", "search", "adapt", "detect"):
        assert f"job-{job}" in page.ids, job
    start = text.index('id="job-train"')
    train = text[start:text.index("</section>", start)]
    assert "train-r2" in train and "train-r4" in train and "continual" not in train.split(
        "Settings that differ")[0]
    # the learning curves of both training runs are overlaid in one figure (legend text in the SVG)
    curves = [s for s in _images(_parse(train)) if b"training loss" in s]
    assert len(curves) == 1 and b"train-r2" in curves[0] and b"train-r4" in curves[0]
    # settings that differ between the two training runs: the rank and the learning rate
    differ = train[train.index("Settings that differ"):train.index("Settings all runs share")]
    assert "spec.r" in differ and "config.lr" in differ and "config.batch_size" not in differ


def test_job_specific_tables_and_figures(report, runs):
    text = report.read_text(encoding="utf-8")
    cl = json.loads((runs / "continual" / "results.json").read_text())
    section = text[text.index('id="job-continual"'):]
    start = section.index('class="matrix"')
    matrix = section[start:section.index("</table>", start)]
    n = len(cl["tasks"])
    assert matrix.count("<tr>") == n + 1 and matrix.count("<td") == n * n
    svgs = b"".join(_images(_parse(text)))
    assert b"average accuracy (seen tasks)" in svgs  # continual
    assert b"validation accuracy" in svgs and b"trainable delta parameters" in svgs  # Pareto
    assert b"error % (running)" in svgs and b"p-value" in svgs  # TTA and drift timelines
    search = text[text.index('id="job-search"'):]
    assert "lora r=8 @qv" in search and "0.66" in search
    merge = text[text.index('id="job-merge"'):]
    assert "ties" in merge and "m1" in merge


def test_the_report_renders_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    from PIL import Image

    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1280,2000", report.resolve().as_uri()],
                   capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    small = image.resize((128, 200))
    pixels = list(small.getdata())
    ink = sum(1 for p in pixels if sum(p) < 600) / len(pixels)
    assert ink > 0.05, f"only {ink:.1%} of the screenshot is not white"
    assert len(set(image.getdata())) > 100  # text, tables and plots, not a flat page
    r, g, b = image.getpixel((20, 20))  # the header band
    assert b > r + 40 and r < 80, (r, g, b)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys):
    out = tmp_path / "r.html"
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert main(["report", str(empty), "--out", str(out)]) == 2
    assert "holds no deltatune run" in _error(capsys) and not out.exists()
    assert main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in _error(capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text('{"job": "train",')
    assert main(["report", str(runs / "train-r2"), str(broken), "--out", str(out)]) == 2
    assert "is not valid JSON" in _error(capsys) and not out.exists()
    mixed = tmp_path / "mixed"  # says continual, holds a training run's results
    mixed.mkdir()
    results = json.loads((runs / "train-r2" / "results.json").read_text())
    (mixed / "results.json").write_text(json.dumps({**results, "job": "continual"}))
    assert main(["report", str(mixed), "--out", str(out)]) == 2
    assert "says job 'continual' but has no 'accuracy_matrix'" in _error(capsys)
    assert not list(tmp_path.glob(".r.html*")) and not out.exists()


def test_out_never_replaces_an_input_or_a_foreign_file(runs, tmp_path, capsys):
    run = runs / "train-r2"
    before = (run / "results.json").read_bytes()
    assert main(["report", str(run), "--out", str(run / "results.json")]) == 2
    assert "inside the run directory" in _error(capsys)
    assert main(["report", str(run), "--out", str(run / "report.html")]) == 2
    assert "inside the run directory" in _error(capsys)
    assert main(["report", str(run), "--out", str(run)]) == 2
    assert "is a directory" in _error(capsys)
    notes = tmp_path / "notes.html"
    notes.write_text("<p>mine</p>")
    assert main(["report", str(run), "--out", str(notes), "--overwrite"]) == 2
    assert "not a report deltatune wrote" in _error(capsys) and notes.read_text() == "<p>mine</p>"
    assert (run / "results.json").read_bytes() == before and not (run / "report.html").exists()


def test_overwrite_replaces_only_a_report_and_a_failure_keeps_the_old_one(runs, tmp_path, capsys,
                                                                           monkeypatch):
    out = tmp_path / "r.html"
    assert main(["report", str(runs / "train-r2"), "--out", str(out)]) == 0
    first = out.read_text()
    assert report_html.is_report(out) and "train-r2" in first
    assert main(["report", str(runs / "train-r4"), "--out", str(out)]) == 2
    assert "pass --overwrite" in _error(capsys) and out.read_text() == first

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_html, "render", boom)
    assert main(["report", str(runs / "train-r4"), "--out", str(out), "--overwrite"]) == 1
    assert out.read_text() == first and not list(tmp_path.glob(".r.html.*"))
    monkeypatch.undo()
    assert main(["report", str(runs / "train-r4"), "--out", str(out), "--overwrite"]) == 0
    assert "train-r4" in out.read_text() and "train-r2" not in out.read_text()


def test_values_from_results_are_escaped(runs, tmp_path):
    run = tmp_path / "evil"
    shutil.copytree(runs / "eval-fog", run)
    results = json.loads((run / "results.json").read_text())
    results["data"] = '<script>alert("x")</script>'
    (run / "results.json").write_text(json.dumps(results))
    (run / "fake.png").write_text("<svg onload=alert(1)>")  # not a PNG: listed, not embedded
    out = tmp_path / "r.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    page = _parse(out.read_text())
    assert "script" not in page.tags and '<script>alert("x")</script>' in "".join(page.text)
    assert "fake.png: not a PNG file" in out.read_text()


def test_python_api_finds_runs_once_and_labels_them_uniquely(runs):
    found = report_html.find_runs([runs, runs / "train-r2"])
    names = [r.label for r in found]
    assert len(names) == len(set(names)) and sorted(names).count("train-r2") == 1
    assert {r.job for r in found} == {"train", "eval", "compress", "continual", "adapt",
                                      "detect", "merge", "search"}
    assert all(r.job != "search-trial" for r in found)  # the search shows its trials
    trial = report_html.find_runs([runs / "search" / "trial_0"])  # given by name: a run
    assert [r.job for r in trial] == ["search-trial"]
    assert "lora r=1 @qv" in report_html.render(trial)
