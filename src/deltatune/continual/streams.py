"""Task streams: a sequence of tasks (train/test data each) built from any labelled data set.

- class-incremental: each task brings new classes (``split-mnist``: 0/1, 2/3, ...;
  ``bbc-news-classinc``); one head over every class, and at test time the task id is hidden unless
  asked for;
- domain-incremental: the same classes under a new input distribution each task (``tweet-domains``:
  airlines → nfl → apple → cars; ``mnist-corruptions``: MNIST under a sequence of corruptions).

A user stream is a CSV/JSONL/folder data set plus a class order: ``my.csv@0,1;2,3`` (classes by
label index, tasks separated by ``;``), class-incremental; or a data set plus a task column:
``my.csv@task`` (one task per value of the file's ``task`` column, in sorted order) or
``my.csv@task=a,b,c`` (those values in that order), domain-incremental. Bundled data with a
``domain`` field work the same way: ``tweet-sentiment@domain=apple,cars``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..core.errors import DeltaError
from ..data import Dataset, load_data


class ContinualError(DeltaError):
    """A stream or strategy setting that cannot work (overlapping classes, empty task, wrong
    head...)."""


@dataclass
class Task:
    name: str
    train: Dataset
    test: Dataset
    classes: list[int]  # the labels this task's data use


@dataclass
class Stream:
    name: str
    scenario: Literal["class", "domain"]
    tasks: list[Task]
    label_names: list[str]
    task_kind: str  # the data's task (text-classification / image-classification)

    def __post_init__(self) -> None:
        if len(self.tasks) < 2:
            raise ContinualError(
                f"stream {self.name!r} has {len(self.tasks)} task(s); a stream needs at least two"
            )
        seen: set[int] = set()
        for t in self.tasks:
            if len(t.train) == 0 or len(t.test) == 0:
                raise ContinualError(
                    f"task {t.name!r} of stream {self.name!r} has no training or test examples; "
                    "check its classes/domain and the limits"
                )
            if self.scenario == "class":
                overlap = seen & set(t.classes)
                if overlap:
                    raise ContinualError(
                        f"task {t.name!r} repeats classes {sorted(overlap)} of an earlier task; a "
                        "class-incremental stream needs disjoint classes (use a domain stream)"
                    )
                seen |= set(t.classes)


STREAMS = {
    "split-mnist": "MNIST digits in 5 class-incremental tasks: 0/1, 2/3, 4/5, 6/7, 8/9 (small-cnn)",
    "bbc-news-classinc": "BBC News topics in 3 class-incremental tasks: business/entertainment, "
    "politics/sport, tech",
    "tweet-domains": "tweet sentiment, domain-incremental: airlines -> nfl -> apple -> cars",
    "mnist-corruptions": "MNIST digits, domain-incremental over corruptions at severity 3: "
    "fog -> zoom_blur -> contrast -> impulse_noise",
}
TWEET_DOMAINS = ("airlines", "nfl", "apple", "cars")
CORRUPTIONS = ("fog", "zoom_blur", "contrast", "impulse_noise")


def _subset(data: Dataset, classes: list[int], suffix: str) -> Dataset:
    keep = set(classes)
    return Dataset(
        f"{data.name}{suffix}",
        data.task,
        [e for e in data.examples if e["label"] in keep],
        data.label_names,
    )


def _class_stream(
    name: str, spec: str, groups: list[list[int]], limit_train, limit_test, seed, held="test"
) -> Stream:
    train, test = (
        load_data(spec, "train", seed=seed, limit=limit_train),
        load_data(spec, held, seed=seed, limit=limit_test),
    )
    bad = [c for g in groups for c in g if not 0 <= c < len(train.label_names)]
    if bad:
        raise ContinualError(
            f"class order names labels {bad} but {spec} has {len(train.label_names)} classes"
        )
    tasks = [
        Task(
            "+".join(train.label_names[c] for c in g),
            _subset(train, g, f"[{i}]"),
            _subset(test, g, f"[{i}]"),
            g,
        )
        for i, g in enumerate(groups)
    ]
    return Stream(name, "class", tasks, train.label_names, train.task)


def _domain_stream(
    name: str, specs: list[tuple[str, str]], limit_train, limit_test, seed, held="test"
) -> Stream:
    tasks = []
    for label, spec in specs:
        tr, te = (
            load_data(spec, "train", seed=seed, limit=limit_train),
            load_data(spec, held, seed=seed, limit=limit_test),
        )
        tasks.append(Task(label, tr, te, sorted(set(tr.labels))))
    names = tasks[0].train.label_names
    if any(t.train.label_names != names for t in tasks):
        raise ContinualError(
            f"the domains of {name} do not share one label set; a domain stream needs the same "
            "classes"
        )
    return Stream(name, "domain", tasks, names, tasks[0].train.task)


def _column_stream(
    name: str, spec: str, column: str, values: list[str] | None, limit_train, limit_test, seed
) -> Stream:
    """Domain-incremental: one task per value of an example field (a user file's ``task`` column,
    ...)."""
    train, test = (
        load_data(spec, "train", seed=seed, limit=limit_train),
        load_data(spec, "test", seed=seed, limit=limit_test),
    )
    if not train.examples or column not in train.examples[0]:
        have = sorted(
            k
            for k in (train.examples[0] if train.examples else {})
            if k not in ("text", "label", "image")
        )
        raise ContinualError(
            f"{spec} has no {column!r} column to split tasks by (it has: "
            f"{', '.join(have) or 'none'}); add a 'task' column to the file, or give a class order "
            "like PATH@0,1;2,3"
        )
    present = sorted(
        {str(e[column]) for e in train.examples}
    )  # the split is shuffled: file order is gone
    if values is None:
        values = present
    missing = [v for v in values if v not in present]
    if missing:
        raise ContinualError(
            f"{column} value(s) {missing} do not occur in the training split of {spec}; "
            f"values: {', '.join(present)}"
        )
    if len(set(values)) != len(values):
        raise ContinualError(f"the task order {values} repeats a value; name every task once")
    tasks = []
    for v in values:
        tr = Dataset(
            f"{train.name}[{v}]",
            train.task,
            [e for e in train.examples if str(e[column]) == v],
            train.label_names,
        )
        te = Dataset(
            f"{test.name}[{v}]",
            test.task,
            [e for e in test.examples if str(e[column]) == v],
            test.label_names,
        )
        tasks.append(Task(v, tr, te, sorted(set(tr.labels))))
    return Stream(name, "domain", tasks, train.label_names, train.task)


def make_stream(
    spec: str, *, limit_train: int | None = None, limit_test: int | None = None, seed: int = 0,
    held: Literal["test", "val"] = "test",
) -> Stream:
    """A bundled stream by name (see ``STREAMS``) or ``PATH@c,c;c,c`` for a user's data set.

    ``held="val"`` evaluates every task on its validation split instead of the test split: the
    validation stream strategy options are tuned on (bundled streams)."""
    if held not in ("test", "val"):
        raise ContinualError(f"held must be 'test' or 'val', got {held!r}")
    if spec == "split-mnist":
        return _class_stream(spec, "mnist", [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]],
                             limit_train, limit_test, seed, held)
    if spec == "bbc-news-classinc":
        return _class_stream(spec, "bbc-news", [[0, 1], [2, 3], [4]], limit_train, limit_test,
                             seed, held)
    if spec == "tweet-domains":
        return _domain_stream(spec, [(d, f"tweet-sentiment:{d}") for d in TWEET_DOMAINS],
                              limit_train, limit_test, seed, held)
    if spec == "mnist-corruptions":
        return _domain_stream(spec, [(c, f"mnist-c:{c}:3") for c in CORRUPTIONS], limit_train,
                              limit_test, seed, held)
    path, sep, order = spec.rpartition("@")
    if not sep:
        raise ContinualError(
            f"unknown stream {spec!r}; bundled: {', '.join(STREAMS)}, or PATH@0,1;2,3 for your "
            "data (classes by label index, tasks separated by ';'), or PATH@task for a task column"
        )
    column, eq, values = order.partition("=")
    if column.strip() and not column.strip()[0].isdigit():
        wanted = [v.strip() for v in values.split(",") if v.strip()] if eq else None
        if eq and not wanted:
            raise ContinualError(
                f"stream {spec!r} names no values after '='; write {path}@{column}=a,b"
            )
        return _column_stream(spec, path, column.strip(), wanted, limit_train, limit_test, seed)
    try:
        groups = [[int(c) for c in part.split(",") if c.strip()] for part in order.split(";")]
    except ValueError:
        raise ContinualError(f"class order {order!r} must be label indices like 0,1;2,3") from None
    if any(not g for g in groups):
        raise ContinualError(
            f"class order {order!r} has an empty task; every task needs at least one class"
        )
    return _class_stream(spec, path, groups, limit_train, limit_test, seed)
