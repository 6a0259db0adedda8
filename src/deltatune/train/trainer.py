"""``fit``: train the parameters that have ``requires_grad`` (the deltas) on any model + dataset
+ collate.

AdamW with warmup + linear/cosine decay, gradient accumulation and clipping, a seeded per-epoch
permutation (so a resumed run continues mid-epoch on exactly the batches it would have seen),
evaluation each epoch with best-state keeping, atomic resumable checkpoints, metrics.json and a
learning curve. It runs on accelerate: one CPU or GPU, or ``accelerate launch`` DDP unchanged.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..lm.loss import LossError
from ..lm.objectives import ObjectiveError
from . import accel, checkpoint, rng
from .callbacks import call, callbacks_from_specs
from .config import CheckpointError, TrainConfig, TrainError, selection_metric, task_kind
from .losses import (
    class_weights,
    compute_loss,
    evaluate_shard,
    forward,
    labels_of,
    objective_of,
    to_device,
)
from .memory import gradient_checkpointing, require_checkpointing
from .optim import Plan, build_optimizer, lr_factor, norm_buffers, norm_layers, trainable_parameters
from .report import ProgressBar, TrainResult, peak_rss_mb, plot_curve, write_metrics
from .state import TrainState, check_compatible, restore, snapshot


def fit(
    model: nn.Module,
    train_data,
    collate: Callable[[list], dict],
    config: TrainConfig | None = None,
    *,
    eval_data=None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    spec_callbacks: bool = False,
    task: str = "text-classification",
    reference: Callable[[nn.Module], Any] | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``train_data`` and return what happened.

    ``train_data[i]`` are examples; ``collate(list_of_examples)`` makes a dict batch whose
    ``labels`` are removed before ``model(**batch)``, which returns logits: (batch, classes) for a
    ``*classification`` task, (batch, time, vocab) for ``causal-lm`` (shifted next-token loss,
    labels -100 ignored). A causal LM trains with ``config.objective`` (:mod:`deltatune.lm.
    objectives`: sft or dpo); one with a separate head (:class:`deltatune.models.text.CausalLM`)
    through the chunked loss, never building the whole batch's logits. ``reference(model)`` is
    the context in which the model computes DPO's reference (default: its deltas disabled).
    With ``out_dir``: ``metrics.json``, ``learning_curve.png`` and, every
    ``config.save_every`` steps, ``checkpoint/``; ``resume=True`` continues from that checkpoint
    (bit-identical to an uninterrupted run on CPU) or starts fresh, with a warning, if there is
    none. The model ends on the training device in eval mode, holding the best evaluated tensors
    when ``config.keep_best`` (else the last ones). See :mod:`deltatune.train.callbacks` for
    ``callbacks``; ``spec_callbacks=True`` adds the ones the active deltas' specs need (AdaLoRA's
    pruning, IncreLoRA's growth, over this run's length) unless ``callbacks`` already holds them.
    """
    cfg = TrainConfig() if config is None else config
    if not isinstance(cfg, TrainConfig):
        raise TrainError(f"config must be a TrainConfig, not {type(cfg).__name__}")
    kind = task_kind(task)
    if kind != "causal-lm" and cfg.objective != "auto":
        raise TrainError(
            f"TrainConfig.objective={cfg.objective!r} trains causal LMs; a {task} model trains "
            "with cross-entropy (objective='auto')"
        )
    metric, higher = selection_metric(cfg.metric, kind)
    if len(train_data) == 0:
        raise TrainError("the training data is empty; check the dataset name, split and limit")
    if eval_data is not None and len(eval_data) == 0:
        raise TrainError("eval_data is empty; pass None to train without evaluation")
    trainable_parameters(model)  # fails early when there is nothing to train
    if cfg.gradient_checkpointing:
        require_checkpointing(model)
    accel.check_settings(cfg)  # device, precision and compile: before anything runs
    out = Path(out_dir) if out_dir is not None else None
    if out is None and (resume or cfg.save_every):
        raise TrainError(
            "resume and TrainConfig.save_every need out_dir (where checkpoints are written)"
        )
    callbacks = list(callbacks)
    if cfg.lisa_layers:
        from .lisa import LISA

        callbacks.insert(0, LISA(cfg.lisa_layers, cfg.lisa_interval, cfg.seed))
    run = _Run(
        model, train_data, collate, cfg, eval_data, out, callbacks, task, kind, metric, higher,
        reference,
    )
    if spec_callbacks:  # after _Run: they need the run's length; run.callbacks is this same list
        callbacks += callbacks_from_specs(model, run.total, callbacks)
    if resume:
        run.resume()
    try:
        with gradient_checkpointing(model, cfg.gradient_checkpointing):
            return run.train()
    finally:
        call(callbacks, "on_train_end", model)


class _Run:
    """One call of :func:`fit`: the live objects and the loop over optimizer steps."""

    def __init__(self, model, train_data, collate, cfg: TrainConfig, eval_data, out: Path | None,
                 callbacks: list, task: str, kind: str, metric: str, higher: bool,
                 reference: Callable[[nn.Module], Any] | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.model, self.train_data, self.collate, self.cfg = model, train_data, collate, cfg
        self.eval_data, self.out, self.callbacks = eval_data, out, callbacks
        self.task, self.kind, self.metric, self.higher = task, kind, metric, higher
        # accelerate sets up gloo DDP on CPU only when told cpu=True; on a GPU machine it picks the
        # GPU.
        _forget_foreign_precision()
        self.acc = Accelerator(cpu=accel.wants_cpu(cfg))
        self.world, self.rank, self.device = (
            self.acc.num_processes,
            self.acc.process_index,
            self.acc.device,
        )
        accel.check_precision(cfg, self.device)
        # Each process gets its own seed (seed + rank): different dropout masks on different data.
        set_seed(cfg.seed, device_specific=True)
        model.to(self.device)
        # FSDP shards only across several processes; on one it is the plain loop.
        self.sharded = bool(cfg.fsdp and self.world > 1)
        if self.sharded:
            self._check_eval_shards(cfg)
            accel.enable_fsdp(self.acc)
            # accelerate's FSDP2 needs the optimizer with the model: it swaps the optimizer's
            # parameters for the sharded ones
            prepared = self.acc.prepare(model, build_optimizer(trainable_parameters(model), cfg))
            self.wrapped, self.opt = prepared[0], prepared[1].optimizer
        else:
            if self.world > 1:
                accel.disable_fsdp(self.acc)  # a sharded fit earlier in these processes
            # The DDP wrapper under accelerate launch. Wrapping may replace buffer tensors, so
            # every reference to the model's tensors is taken after it.
            self.wrapped = self.acc.prepare_model(model)
        self.named = trainable_parameters(model)
        self.buffers = norm_buffers(model)
        self.norms = [
            m for _, m in norm_layers(model)
        ]  # found once; _hold_norm_stats runs every step
        if not self.sharded:
            self.opt = build_optimizer(self.named, cfg)
        self.scaler = accel.grad_scaler(cfg, self.device)
        # the training forward (compiled with cfg.compile); evaluation runs the plain module
        self.forward_module = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.weight = self._class_weights()
        self.objective = objective_of(cfg, kind, reference)
        self.plan = Plan(len(train_data), cfg.batch_size, self.world, cfg.grad_accum)
        self.total = cfg.max_steps or cfg.epochs * self.plan.steps_per_epoch
        self.warmup = math.ceil(cfg.warmup_ratio * self.total)
        self.state = TrainState()
        self.best: dict[str, torch.Tensor] = {}
        self.rng_files: tuple[dict, dict] | None = None
        self.resumed_from: int | None = None
        self.info = {
            "task": task,
            "task_kind": kind,
            "world_size": self.world,
            "n_train": len(train_data),
            "config": cfg.to_dict(),
            "total_steps": self.total,
            "warmup_steps": self.warmup,
        }

    def _class_weights(self) -> torch.Tensor | None:
        spec = self.cfg.class_weights
        if spec is None:
            return None
        if self.kind == "causal-lm":
            raise TrainError(
                "TrainConfig.class_weights applies to classification; a causal LM has no classes"
            )
        labels = []
        if spec == "balanced":  # Dataset.labels, else the 'label' field of every example
            labels = list(getattr(self.train_data, "labels", None) or [
                ex["label"] for ex in (self.train_data[i] for i in range(len(self.train_data)))
                if isinstance(ex, dict) and "label" in ex])
        names = getattr(self.train_data, "label_names", None)
        return class_weights(spec, labels, len(names) if names else None).to(self.device)

    def _check_eval_shards(self, cfg: TrainConfig) -> None:
        """Under FSDP every forward is a collective: all processes must evaluate the same number
        of batches, or the run hangs."""
        if self.eval_data is None:
            return
        counts = {math.ceil(len(range(r, len(self.eval_data), self.world)) / cfg.eval_batch_size)
                  for r in range(self.world)}
        if len(counts) > 1:
            raise TrainError(
                f"under FSDP the {len(self.eval_data)} evaluation examples split into unequal "
                f"numbers of batches of {cfg.eval_batch_size} over {self.world} processes; change "
                "TrainConfig.eval_batch_size by one"
            )

    # -- resume -----------------------------------------------------------------------------------
    def resume(self) -> None:
        found = checkpoint.find(self.out)
        if found is None:
            warnings.warn(
                f"resume=True but {self.out} has no checkpoint; training from the start",
                stacklevel=3,
            )
            return
        files, meta = checkpoint.load(found)
        check_compatible(meta, self.cfg, self.info)
        if self.sharded:  # the checkpoint holds whole tensors: cut them like the live shards
            live = dict(self.named)
            for part in ("model", "best"):
                if part in files:
                    files[part] = accel.shard_like(files[part], live)
            state_of = {f"{n}/{k}": live[n] for n in live for k in ("exp_avg", "exp_avg_sq")}
            files["optimizer"] = accel.shard_like(files.get("optimizer", {}), state_of)
        self.state, self.best = restore(files, meta, self.named, self.buffers, self.opt)
        self.rng_files = (files.get("rng", {}), meta.get("rng", {}))
        self.resumed_from = self.state.step

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg, st, plan = self.cfg, self.state, self.plan
        call(self.callbacks, "on_train_start", self.model)
        if self.rng_files is not None:  # last, so nothing between here and the next step draws
            try:
                rng.restore(*self.rng_files, self.rank, self.device)
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise CheckpointError(
                    f"the checkpoint's random states are malformed ({exc}); delete it or "
                    "train without resume"
                ) from None
        bar = ProgressBar(cfg.progress and self.acc.is_main_process, self.total, st.step)
        started, self.train_seconds, samples_before = time.perf_counter(), 0.0, st.samples
        try:
            while st.step < self.total:
                order = plan.order(cfg.seed, st.epoch)
                while st.micro < plan.micro_per_epoch and st.step < self.total:
                    tick = time.perf_counter()
                    record = self._step(order)
                    self.train_seconds += time.perf_counter() - tick
                    rate = (st.samples - samples_before) / max(self.train_seconds, 1e-9)
                    bar.update(st.step, record["loss"], rate)
                    call(self.callbacks, "on_step_end", self.model, st.step)
                    if cfg.save_every and st.step % cfg.save_every == 0:
                        self._save()
                if st.micro >= plan.micro_per_epoch:
                    self._end_epoch(bar)
            self._final_evaluation(bar)
            if cfg.save_every:
                self._save()
        finally:
            bar.close()
        return self._finish(time.perf_counter() - started, st.samples - samples_before)

    def _step(self, order: torch.Tensor) -> dict[str, Any]:
        """One optimizer step over up to ``grad_accum`` micro-batches of the epoch's permutation."""
        cfg, st = self.cfg, self.state
        first = st.micro
        last = min(first + cfg.grad_accum, self.plan.micro_per_epoch)
        self.wrapped.train()
        self._hold_norm_stats()
        self.opt.zero_grad(set_to_none=True)
        losses, penalties, extras = [], [], {}
        for micro in range(first, last):
            indices, fresh = self.plan.micro_batch(order, micro, self.rank)
            parts = [to_device(self.collate([self.train_data[i] for i in indices]), self.device)]
            parts += [to_device(b, self.device) for b in call(self.callbacks, "extra_batch")]
            sizes = [_batch_size(b) for b in parts]
            for j, batch in enumerate(parts):
                # DDP all-reduces gradients only on the very last backward of the step.
                sync = micro == last - 1 and j == len(parts) - 1
                with nullcontext() if sync else self.acc.no_sync(self.wrapped):
                    loss, outputs, metrics = self._loss(batch)
                    objective = loss * (
                        sizes[j] / sum(sizes)
                    )  # replayed examples count like the others
                    if j == 0:
                        losses.append(loss.detach())
                        for key, value in metrics.items():
                            extras.setdefault(key, []).append(value)
                        for pen in call(self.callbacks, "penalty", self.model, batch, outputs):
                            if not torch.is_tensor(pen) or pen.numel() != 1:
                                raise TrainError(
                                    "a callback's penalty() must return a scalar tensor or None"
                                )
                            objective = objective + pen.reshape(())
                            penalties.append(pen.detach().reshape(()))
                    objective = objective / (last - first)
                    if self.scaler is not None:  # fp16: scaled so small gradients stay normal
                        objective = self.scaler.scale(objective)
                    self.acc.backward(objective)
            st.samples += fresh
        st.micro = last
        record: dict[str, Any] = {
            "step": st.step + 1,
            "epoch": st.epoch + 1,
            "loss": self._mean(losses),
        }
        if not math.isfinite(
            record["loss"]
        ):  # before the update: the model keeps its last good state
            raise TrainError(
                f"the training loss became {record['loss']} at step {st.step + 1}; lower the "
                f"learning rate (TrainConfig.lr={cfg.lr}) or check the data and labels"
            )
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if cfg.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.named], cfg.max_grad_norm)
            if accel.is_sharded(norm):
                norm = norm.full_tensor()
            record["grad_norm"] = float(norm)
        lr = cfg.lr * lr_factor(st.step, self.total, self.warmup, cfg.schedule)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.scaler is not None:  # skips the step when a scaled gradient overflowed
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        st.step += 1
        record["lr"] = lr
        for key, values in extras.items():  # e.g. DPO's rewards and reward accuracy
            record[key] = self._mean(values)
        if penalties:
            record["penalty"] = self._mean(penalties)
        st.steps.append(record)
        self._log("train", record)
        return record

    def _log(self, prefix: str, record: dict[str, Any]) -> None:
        """Hand a step's or an evaluation's numbers to the callbacks' ``on_log`` (trackers)."""
        values = {f"{prefix}/{k}": v for k, v in record.items()
                  if k not in ("step", "epoch", "partial") and isinstance(v, (int, float))
                  and not isinstance(v, bool)}
        if values:
            call(self.callbacks, "on_log", values, self.state.step)

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor]]:
        """The micro-batch's loss, the outputs penalty callbacks see (logits; a causal LM's last
        hidden states) and the objective's metrics."""
        with accel.autocast(self.cfg, self.device):
            if self.objective is None:
                logits = forward(self.forward_module, batch)
                loss = compute_loss(logits, labels_of(batch, self.kind), self.kind, self.weight)
                return loss.float(), logits, {}
            batch = {**batch, "labels": labels_of(batch, self.kind)}
            try:
                out = self.objective.step(self.forward_module, batch)
            except (LossError, ObjectiveError) as exc:
                raise TrainError(str(exc)) from None
            return out.loss.float(), out.outputs, out.metrics

    def _hold_norm_stats(self) -> None:
        """Put the norm layers whose running statistics must not move into eval mode (see
        ``norm_stats``)."""
        mode = self.cfg.norm_stats
        if mode == "update":
            return
        for module in self.norms:  # requires_grad is read each step: LISA changes it during a run
            if mode == "freeze" or not any(
                p.requires_grad for p in module.parameters(recurse=False)
            ):
                module.eval()

    def _mean(self, values: list[torch.Tensor]) -> float:
        mean = torch.stack(values).float().mean()
        return float(self.acc.reduce(mean, "mean") if self.world > 1 else mean)

    # -- evaluation, best state, checkpoints, reports ---------------------------------------------
    def _end_epoch(self, bar: ProgressBar, partial: bool = False) -> None:
        """Close an epoch (or, ``partial``, the run in the middle of one): evaluate, record,
        report."""
        st = self.state
        epoch = st.epoch + 1
        losses = [s["loss"] for s in st.steps if s["epoch"] == epoch]
        record: dict[str, Any] = {"epoch": epoch, "step": st.step}
        if partial:
            record["partial"] = True
        if losses:
            record["train_loss"] = sum(losses) / len(losses)
        self._sync_buffers()
        metrics = (
            self._evaluate(record, bar)
            if self.eval_data is not None and (self.cfg.eval_each_epoch or partial)
            else {}
        )
        if not partial:
            for extra in call(self.callbacks, "on_epoch_end", self.model, epoch, dict(metrics)):
                record.update(extra)
            st.epoch, st.micro = epoch, 0
        st.evals.append(record)
        self._consider_best(record)
        self._write_reports(finished=False, plot=False)

    def _final_evaluation(self, bar: ProgressBar) -> None:
        """Evaluate the end state once when no evaluation happened at the last step."""
        st = self.state
        if self.eval_data is None or any(e["step"] == st.step and "loss" in e for e in st.evals):
            return
        if st.evals and st.evals[-1]["step"] == st.step:  # an epoch just ended, unevaluated
            self._sync_buffers()
            self._evaluate(st.evals[-1], bar)
            self._consider_best(st.evals[-1])
        else:  # max_steps stopped the run in the middle of an epoch
            self._end_epoch(bar, partial=True)

    def _evaluate(self, record: dict[str, Any], bar: ProgressBar) -> dict[str, Any]:
        reduce = (lambda t: self.acc.reduce(t, "sum")) if self.world > 1 else None
        shard = len(range(self.rank, len(self.eval_data), self.world))
        with bar.subtask("eval", shard) as advance:
            metrics = evaluate_shard(
                self.model,
                self.eval_data,
                self.collate,
                self.kind,
                self.cfg.eval_batch_size,
                self.device,
                self.rank,
                self.world,
                reduce,
                objective=self.objective,
                progress=advance,
            )
        record.update(metrics)
        self._log("eval", record)
        bar.note(
            f"epoch {record['epoch']}{' (partial)' if record.get('partial') else ''} "
            f"step {record['step']}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        )
        return metrics

    def _consider_best(self, record: dict[str, Any]) -> None:
        # a callback may veto a state as the one to restore (AdaLoRA before its final allocation):
        # the best is the best of the states the model may end in, not of every evaluation
        if False in call(self.callbacks, "keeps_best", self.model, record["step"]):
            return
        if self.metric in record and self._better(record[self.metric]):
            self.state.best = dict(record)
            if self.cfg.keep_best:
                self.best = {
                    n: t.detach().to("cpu", copy=True) for n, t in [*self.named, *self.buffers]
                }

    def _sync_buffers(self) -> None:
        # DDP copies rank 0's buffers to the others at the start of each forward, so after the last
        # step each process holds its own BatchNorm statistics; make rank 0's the common ones.
        if self.world > 1:
            for _, buf in self.buffers:
                torch.distributed.broadcast(buf.data, src=0)

    def _better(self, value: float) -> bool:
        if self.state.best is None:
            return True
        best = self.state.best[self.metric]
        return value > best if self.higher else value < best

    def _save(self) -> None:
        # Gathering the RNG states is a collective: every process takes part, only rank 0 writes.
        states = rng.gather(rng.capture(self.device), self.world, self.device, self.acc.gather)
        if self.sharded:  # gathering the shards is a collective too
            files, meta = snapshot(
                self.named, self.buffers, self.opt, self.state, self.best, states, self.info
            )
            files = {part: accel.gather_full(tensors) for part, tensors in files.items()}
            if self.acc.is_main_process:
                checkpoint.save(self.out, files, meta)
        elif self.acc.is_main_process:
            files, meta = snapshot(
                self.named, self.buffers, self.opt, self.state, self.best, states, self.info
            )
            checkpoint.save(self.out, files, meta)
        self.acc.wait_for_everyone()

    def _finish(self, seconds: float, samples: int) -> TrainResult:
        st = self.state
        self._sync_buffers()
        if self.cfg.keep_best and self.best:
            with torch.no_grad():
                for name, tensor in [*self.named, *self.buffers]:
                    tensor.copy_(self.best[name])
        if self.sharded:  # whole tensors again: what follows fit saves and evaluates the model
            accel.unshard(self.model)
        self.model.eval()
        evaluated = [e for e in st.evals if "loss" in e]
        train_losses = [e["train_loss"] for e in st.evals if "train_loss" in e]
        result = TrainResult(
            steps=st.step, epochs_done=st.epoch, seconds=seconds, train_seconds=self.train_seconds,
            samples=samples, samples_per_second=samples / max(self.train_seconds, 1e-9),
            final=dict(evaluated[-1]) if evaluated else {}, best=dict(st.best or {}),
            train_loss=train_losses[-1] if train_losses else None, peak_rss_mb=peak_rss_mb(),
            resumed_from_step=self.resumed_from, out_dir=str(self.out) if self.out else None,
        )
        if self.out is not None:
            result.metrics_path = str(self.out / "metrics.json")
            result.checkpoint_path = (
                str(self.out / checkpoint.NAME) if self.cfg.save_every else None
            )
            curve = self._write_reports(finished=True, plot=True, result=result)
            result.curve_path = str(curve) if curve else None
        self.acc.wait_for_everyone()
        return result

    def _write_reports(
        self, finished: bool, plot: bool, result: TrainResult | None = None
    ) -> Path | None:
        if self.out is None or not self.acc.is_main_process:
            return None
        st = self.state
        metrics = {
            **{k: v for k, v in self.info.items() if k != "config"},
            "metric": self.metric,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "trainable_parameters": sum(p.numel() for _, p in self.named),
            "finished": finished,
            "resumed_from_step": self.resumed_from,
            "config": self.info["config"],
            "best": st.best,
            "final": result.final if result else None,
            "epochs": st.evals,
            "steps": st.steps,
        }
        if result is not None:
            metrics["throughput"] = {
                "samples": result.samples,
                "train_seconds": result.train_seconds,
                "samples_per_second": result.samples_per_second,
                "seconds": result.seconds,
            }
            metrics["peak_rss_mb"] = result.peak_rss_mb
        write_metrics(self.out, metrics)
        return (
            plot_curve(self.out, st.steps, [e for e in st.evals if "loss" in e], self.metric)
            if plot
            else None
        )


def _batch_size(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
    raise TrainError("a batch holds no tensors; collate (or extra_batch) must return tensors")


def _forget_foreign_precision() -> None:
    """accelerate keeps one process-wide state: a trainer of another library run earlier in this
    process (trl's configs default to bf16) leaves its mixed precision there, and every later
    ``Accelerator()`` inherits it. deltatune trains in the precision of its own launch (accelerate
    launch's --mixed_precision / ACCELERATE_MIXED_PRECISION, default fp32), so a precision set by
    someone else is dropped first."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    launch = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if shared and str(shared.get("_mixed_precision", "no")) != launch:
        AcceleratorState._reset_state()

