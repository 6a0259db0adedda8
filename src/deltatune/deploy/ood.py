"""Per-input out-of-distribution scores: is *this* input like the data the model was fitted on?

    import deltatune.deploy as dd
    s = dd.ood_scores(model, reference, inputs, method="knn")   # one score per input; higher = OOD
    scorer = dd.fit_ood(model, reference, method="mahalanobis") # fit once ...
    scorer.score(model, inputs); scorer.flags(model, inputs)    # ... score any batch, flag outliers
    scorer.save("runs/ood"); dd.OODScorer.load("runs/ood")       # safetensors + JSON, no pickle

Every score is an *outlier* score: higher means less like the reference. The scores read the
model's logits (``msp``, ``energy``), its penultimate features (``mahalanobis``, ``knn``: the input
of ``layer``, by default the last ``nn.Linear``) or both (``vim``, which also reads the head's
weights). A scorer stores only tensors and JSON, so it can be shipped beside the model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .batch import call_model, get_logits, iter_batches, last_linear, tap_input, to_tensor
from .errors import DeployError
from .oodrules import SCORES, ScoreMethod, kth_distance, unit

FORMAT_VERSION = 1
#: quantile of the reference scores above which ``flags`` calls an input out-of-distribution
DEFAULT_QUANTILE = 0.95


# -- inputs ---------------------------------------------------------------------------------------
def _rows(value: Any, name: str, width: int | None = None) -> torch.Tensor:
    try:
        t = to_tensor(value).to(torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DeployError(f"{name} must be a tensor or array (one row per input): {exc}") from exc
    if t.dim() != 2 or t.shape[0] == 0:
        raise DeployError(f"{name} must have shape (inputs, columns), got {tuple(t.shape)}")
    if width is not None and t.shape[1] != width:
        raise DeployError(f"{name} have {t.shape[1]} columns but the scorer was fitted on {width}; "
                          "compute them with the same model and layer")
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).any(1).sum())
        raise DeployError(f"{name} hold NaN or inf values ({bad} of {len(t)} rows); drop or "
                          "repair those inputs before scoring")
    return t


def represent(model: nn.Module, data: Any, needs: tuple[str, ...], *, layer: str | None = None,
              batch_size: int = 256, logits_fn: Any = None
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(features, logits) of ``model`` over ``data`` in one pass; each None unless ``needs`` it.
    Features are the input of ``layer`` (default: the last ``nn.Linear``)."""
    want_features = "features" in needs
    if want_features and layer is None:
        try:
            layer = last_linear(model)
        except DeployError:
            raise DeployError(
                "this score reads penultimate features and the model has no nn.Linear head; pass "
                "layer='module.name' (its input is the feature) or use method 'msp' or 'energy'"
            ) from None
    feats: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in iter_batches(data, batch_size):
                if want_features:
                    with tap_input(model, layer) as seen:
                        out = call_model(model, batch)
                    feats.append(seen[-1].double().cpu())
                else:
                    out = call_model(model, batch)
                if "logits" in needs:
                    logits.append(get_logits(out, logits_fn).double().cpu())
    finally:
        model.train(was_training)
    if not feats and not logits:
        raise DeployError("the data yielded no batches; nothing to score")
    return (torch.cat(feats) if feats else None), (torch.cat(logits) if logits else None)


def head_of(model: nn.Module, layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the linear head whose input the features are (for ViM)."""
    module = dict(model.named_modules()).get(layer or last_linear(model))
    if not isinstance(module, nn.Linear):
        raise DeployError("vim needs the features to be the input of an nn.Linear head; pass the "
                          "head's name as layer=")
    bias = module.bias if module.bias is not None else torch.zeros(module.out_features)
    return module.weight.detach().double().cpu(), bias.detach().double().cpu()


def _cross_fitted(rule: ScoreMethod, f: torch.Tensor, z: torch.Tensor | None,
                  kwargs: dict[str, Any], opts: dict[str, Any], folds: int = 5) -> torch.Tensor:
    """Out-of-sample scores of the reference: each fifth scored by a fit on the other four. A
    Gaussian or a subspace fitted on the very samples it scores fits their noise too, so in-sample
    scores run low and a threshold from them flags far more than ``1 - quantile`` of new
    in-distribution inputs when the reference is not much larger than the feature width."""
    n = len(f)
    fold = torch.randperm(n, generator=torch.Generator().manual_seed(0)) % folds
    out = torch.empty(n, dtype=torch.float64)
    score_opts = {k: v for k, v in opts.items() if v is not None}
    for k in range(folds):
        held, kept = fold == k, fold != k
        part = {key: (v[kept] if key == "labels" else v) for key, v in kwargs.items()}
        state = rule.fit(features=f[kept], logits=None if z is None else z[kept], **part)
        out[held] = rule.score(state, features=f[held], logits=None if z is None else z[held],
                               **score_opts).double()
    return out


# -- the scorer -----------------------------------------------------------------------------------
class OODScorer:
    """A fitted per-input OOD score (see the module docs); higher scores = more unusual inputs.

    ``threshold`` is the ``quantile`` of the reference's own out-of-sample scores (leave-one-out
    for ``knn``, 5-fold cross-fitted for ``mahalanobis`` and ``vim``): ``flags`` marks inputs above
    it, so about ``1 - quantile`` of in-distribution inputs are flagged by construction.
    """

    def __init__(self, method: str, state: dict[str, torch.Tensor], options: dict[str, Any], *,
                 width: int | None, classes: int | None, layer: str | None,
                 threshold: float, quantile: float) -> None:
        self.method, self.state, self.options = method, state, options
        self.width, self.classes, self.layer = width, classes, layer
        self.threshold, self.quantile = threshold, quantile
        self.rule = SCORES.get(method)
        #: out-of-sample scores of the reference after a fit (None after ``load``)
        self.reference_scores: torch.Tensor | None = None

    # fitting
    @classmethod
    def fit_representations(cls, method: str, *, features: Any = None, logits: Any = None,
                            labels: Any = None, head: tuple[Any, Any] | None = None,
                            layer: str | None = None, quantile: float = DEFAULT_QUANTILE,
                            **options: Any) -> "OODScorer":
        """Fit on reference features/logits already computed (``head`` = (weight, bias) for
        ``vim``; ``labels`` for ``mahalanobis``, default the argmax of ``logits``)."""
        rule = SCORES.get(method)
        bad = [k for k in options if k not in rule.options]
        if bad:
            known = ", ".join(rule.options) or "none"
            raise DeployError(f"{method}: no option {bad[0]!r}; its options: {known}")
        if not 0 < quantile < 1:
            raise DeployError(f"quantile={quantile} must lie in (0, 1), e.g. 0.95")
        opts = {**rule.options, **options}
        f = _rows(features, "reference features") if "features" in rule.needs else None
        z = None
        if "logits" in rule.needs or ("labels" in rule.needs and labels is None):
            if logits is None:
                raise DeployError(f"{method} needs the reference logits")
            z = _rows(logits, "reference logits")
        n = len(f) if f is not None else len(z)
        if f is not None and z is not None and len(z) != n:
            raise DeployError(f"got {len(f)} feature rows and {len(z)} logit rows; one each")
        if n < 2:
            raise DeployError(f"the reference has {n} samples; fit a scorer on at least 2")
        kwargs: dict[str, Any] = {k: v for k, v in opts.items() if v is not None}
        if "labels" in rule.needs:
            y = z.argmax(-1) if labels is None else to_tensor(labels).long().flatten()
            if y.numel() != n:
                raise DeployError(f"got {y.numel()} labels for {n} reference samples")
            kwargs["labels"] = y
        if "head" in rule.needs:
            if head is None:
                raise DeployError("vim needs the head's (weight, bias); fit it through fit_ood "
                                  "with the model, or pass head=")
            w, b = (to_tensor(v).double() for v in head)
            if w.shape[1] != f.shape[1]:
                raise DeployError(f"the head takes {w.shape[1]} features but the reference "
                                  f"features have {f.shape[1]}; use the head's input as features")
            kwargs["weight"], kwargs["bias"] = w, b
        state = rule.fit(features=f, logits=z, **kwargs)
        scorer = cls(method, state, opts, width=None if f is None else f.shape[1],
                     classes=None if z is None else z.shape[1], layer=layer, threshold=math.inf,
                     quantile=quantile)
        if "features" in rule.needs and method != "knn" and n >= 20:
            ref = _cross_fitted(rule, f, z, kwargs, opts)
        else:  # nothing fitted (msp, energy) or leave-one-out (knn): already out-of-sample
            ref = scorer._score(f, z, leave_one_out=True)
        scorer.reference_scores = ref
        scorer.threshold = float(torch.quantile(ref, quantile))
        return scorer

    # scoring
    def score_representations(self, features: Any = None, logits: Any = None, *,
                              leave_one_out: bool = False) -> torch.Tensor:
        """Scores of inputs whose features/logits are already computed (float64, one per row).
        ``leave_one_out``: the inputs are the reference itself (``knn`` skips each one's own
        distance 0)."""
        f = z = None
        if "features" in self.rule.needs:
            if features is None:
                raise DeployError(f"{self.method} scores need features")
            f = _rows(features, "features", self.width)
        if "logits" in self.rule.needs:
            if logits is None:
                raise DeployError(f"{self.method} scores need logits")
            z = _rows(logits, "logits", self.classes)
        if f is not None and z is not None and len(f) != len(z):
            raise DeployError(f"got {len(f)} feature rows and {len(z)} logit rows; one each")
        return self._score(f, z, leave_one_out)

    def score(self, model: nn.Module, inputs: Any, *, batch_size: int = 256,
              logits_fn: Any = None) -> torch.Tensor:
        """Scores of raw ``inputs`` (a tensor or an iterable of batches) through ``model``."""
        f, z = represent(model, inputs, self.rule.needs, layer=self.layer, batch_size=batch_size,
                         logits_fn=logits_fn)
        return self.score_representations(f, z)

    def flags(self, model: nn.Module, inputs: Any, **kwargs: Any) -> torch.Tensor:
        """True for each input whose score is above :attr:`threshold`."""
        return self.score(model, inputs, **kwargs) > self.threshold

    def _score(self, f: torch.Tensor | None, z: torch.Tensor | None,
               leave_one_out: bool = False) -> torch.Tensor:
        opts = {k: v for k, v in self.options.items() if v is not None}
        if leave_one_out and self.method == "knn" and len(f) == len(self.state["bank"]):
            return kth_distance(unit(f), self.state["bank"], opts["k"], skip_self=True)
        s = self.rule.score(self.state, features=f, logits=z, **opts)
        return s.double()

    # files
    def save(self, directory: str | Path) -> Path:
        """``scorer.safetensors`` (the fitted tensors) + ``scorer.json`` (method, options)."""
        from ..io.files import save_tensors, write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_tensors(directory / "scorer.safetensors",
                     self.state or {"empty": torch.zeros(0)})
        write_json(directory / "scorer.json", {
            "format_version": FORMAT_VERSION, "method": self.method, "options": self.options,
            "width": self.width, "classes": self.classes, "layer": self.layer,
            "threshold": self.threshold, "quantile": self.quantile,
        })
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "OODScorer":
        from ..io.files import load_tensors, read_json

        directory = Path(directory)
        if not (directory / "scorer.json").is_file():
            raise DeployError(f"{directory} holds no scorer.json; save a scorer there with "
                              "scorer.save(dir) or deltatune score --save-scorer")
        meta = read_json(directory / "scorer.json")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise DeployError(f"{directory}: scorer format {meta['format_version']} is newer than "
                              "this deltatune reads; upgrade deltatune")
        state = load_tensors(directory / "scorer.safetensors")
        state.pop("empty", None)
        rule = SCORES.get(meta["method"])
        options = {**rule.options, **{k: v for k, v in meta.get("options", {}).items()
                                      if k in rule.options}}
        return cls(meta["method"], state, options, width=meta.get("width"),
                   classes=meta.get("classes"), layer=meta.get("layer"),
                   threshold=float(meta["threshold"]) if meta.get("threshold") is not None
                   else math.inf, quantile=float(meta.get("quantile", DEFAULT_QUANTILE)))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "options": self.options, "width": self.width,
                "classes": self.classes, "layer": self.layer, "threshold": self.threshold,
                "quantile": self.quantile}


def fit_ood(model: nn.Module, reference: Any, method: str = "energy", *, labels: Any = None,
            layer: str | None = None, batch_size: int = 256, quantile: float = DEFAULT_QUANTILE,
            logits_fn: Any = None, **options: Any) -> OODScorer:
    """Fit an OOD scorer on in-distribution ``reference`` inputs (a tensor or an iterable of
    batches) through ``model``. ``labels`` (``mahalanobis``'s class Gaussians) default to the
    model's predictions; ``options`` go to the score (e.g. ``k`` for ``knn``)."""
    rule = SCORES.get(method)
    needs = set(rule.needs) | ({"logits"} if "labels" in rule.needs and labels is None else set())
    if "head" in rule.needs:
        needs.add("logits")
    f, z = represent(model, reference, tuple(needs), layer=layer, batch_size=batch_size,
                     logits_fn=logits_fn)
    head = head_of(model, layer) if "head" in rule.needs else None
    return OODScorer.fit_representations(method, features=f, logits=z, labels=labels, head=head,
                                         layer=layer, quantile=quantile, **options)


def ood_scores(model: nn.Module, reference: Any, inputs: Any, method: str = "energy",
               **kwargs: Any) -> torch.Tensor:
    """One OOD score per input of ``inputs`` (higher = less like ``reference``): :func:`fit_ood`
    on ``reference``, then :meth:`OODScorer.score`. ``msp`` and ``energy`` ignore the reference."""
    batch_size = kwargs.get("batch_size", 256)
    scorer = fit_ood(model, reference, method, **kwargs)
    return scorer.score(model, inputs, batch_size=batch_size, logits_fn=kwargs.get("logits_fn"))


def auroc(in_scores: Any, out_scores: Any) -> float:
    """Area under the ROC curve of telling ``out_scores`` (positives) from ``in_scores`` by
    thresholding the score; ties count half (the Mann-Whitney U statistic)."""
    a = to_tensor(in_scores).double().flatten()
    b = to_tensor(out_scores).double().flatten()
    if a.numel() == 0 or b.numel() == 0:
        raise DeployError("auroc needs at least one in- and one out-of-distribution score")
    both = torch.cat([a, b])
    order = both.argsort()
    ranks = torch.empty_like(both)
    ranks[order] = torch.arange(1, len(both) + 1, dtype=both.dtype)
    # average ranks of ties
    uniq, inverse = torch.unique(both, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=both.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=both.dtype).index_add_(0, inverse, torch.ones_like(both))
    ranks = (sums / counts)[inverse]
    u = float(ranks[len(a):].sum()) - b.numel() * (b.numel() + 1) / 2
    return u / (a.numel() * b.numel())
