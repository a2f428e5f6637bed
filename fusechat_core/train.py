"""Pairwise fusion training (SPEC §1.4): one target = the pivot fine-tuned with

    L = λ·L_CLM + (1-λ)·L_fuse

where L_fuse distils, per sequence, from the teacher the fusion function picks
among {pivot, source j}. λ = 1 is the paper's "CLM" baseline row.

Read top to bottom: config in, checkpoints and a Hugging Face model folder
out. Nothing hides in callbacks; ``on_event`` only reports.

- Devices: accelerate. One process on the CPU or one GPU by default; many GPUs
  (DDP or FSDP) by running ``python -m fusechat_core.train`` under
  ``accelerate launch --config_file ...`` (``TrainConfig.accelerate_config``).
- Data order: fixed by the seed. Epoch e is a permutation drawn from
  (seed, e); optimizer step s takes the global batch ``s`` of that order, so
  the step number alone is the data position and a resumed run sees exactly
  the batches an uninterrupted one would.
- Checkpoints: model, optimizer, scheduler, RNG states (python, numpy, torch,
  cuda) via ``Accelerator.save_state``, plus ``trainer_state.json`` (step,
  data position, metrics so far), each an artifact of its own at
  ``<target>.checkpoints/checkpoint-<step:07d>`` with its own manifest: beside
  the target, never inside the folder a user uploads. A start resumes
  from the newest *complete* one: a checkpoint cut short by a SIGKILL has no
  manifest and is ignored. The last step writes no checkpoint (the target is
  committed instead), and once the target is committed its checkpoints are
  deleted: optimizer state (~87 GB at 7B) resumes nothing then.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusechat_core import stopping
from fusechat_core.config import ModelSpec, RunConfig, TrainConfig, load_config
from fusechat_core.determinism import pin_compute
from fusechat_core.fuse import FUSION_FUNCTIONS, SparseDist, clm_and_fusion_sums, teacher_dist
from fusechat_core.fuse.batches import Batch, FusionData
from fusechat_core.merge.card import target_card
from fusechat_core.models import (
    ModelLoadError,
    load_causal_lm,
    load_tokenizer,
    model_dir,
    resolve_mixed_precision,
    tokenizer_files,
    tokenizer_ref,
    write_files,
)
from fusechat_core.stages import checkpoint_address, checkpoints_prefix, complete_checkpoints
from fusechat_core.store import ArtifactStore, StoreError

STATE_FILE = "trainer_state.json"
TRAINING_LOG = "fusechat_training.json"

Event = dict[str, Any]


class TrainError(RuntimeError):
    """Training cannot start or go on; the message is one line."""


# -- schedule and data order --------------------------------------------------
def steps_per_epoch(n_seq: int, batch_size: int) -> int:
    return math.ceil(n_seq / batch_size)


def total_steps(cfg: TrainConfig, n_seq: int) -> int:
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch(n_seq, cfg.batch_size)))


def epoch_order(n_seq: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of sequence indices for one epoch: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n_seq)


def global_batch(n_seq: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Sequence indices of optimizer step ``step``.

    The last batch of an epoch is filled from the start of the same epoch's
    order, so every step has exactly ``batch_size`` sequences and the same
    number of accumulation micro-steps.
    """
    epoch, k = divmod(step, steps_per_epoch(n_seq, batch_size))
    order = epoch_order(n_seq, seed, epoch)
    return [int(order[(k * batch_size + i) % n_seq]) for i in range(batch_size)]


def micro_batches(batch: list[int], lengths: np.ndarray, micro: int, rank: int = 0,
                  world: int = 1) -> list[list[int]]:
    """This rank's micro-batches of a global batch.

    Sorting by length first puts sequences of similar length together (less
    padding) and, dealt round-robin, gives every rank a similar token load.
    """
    by_len = sorted(batch, key=lambda g: (-int(lengths[g]), g))
    mine = by_len[rank::world]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


# -- checkpoints in the store (addresses: fusechat_core.stages) ------------------
def drop_checkpoints(store: ArtifactStore, target_address: str) -> None:
    """Delete a committed target's checkpoints (torn ones too): nothing resumes from them."""
    for _, address in complete_checkpoints(store, target_address):
        store.delete(address)  # manifests first: none reads as complete while the rest goes
    store.delete(checkpoints_prefix(target_address))


def _staging_dir(address: str) -> Path:
    # The same path on every rank of a node: Accelerator.save_state writes
    # each rank's RNG file into one folder.
    digest = hashlib.sha256(address.encode()).hexdigest()[:16]
    return Path(os.environ.get("FUSECHAT_CACHE", tempfile.gettempdir())) / "train-staging" / digest


# -- loss on a micro-batch -------------------------------------------------------
def micro_batch_sums(model: torch.nn.Module, batch: Batch, *, fusion: Any, temperature: float,
                     use_teachers: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed CLM and fusion cross-entropies of one micro-batch (see ``clm_and_fusion_sums``)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    # the distribution of token t is the model's prediction at position t-1
    student = logits[batch.sup_batch, batch.sup_pos - 1]
    teachers: list[SparseDist] | None = None
    if use_teachers:
        teachers = [teacher_dist(ids, lps, temperature) for ids, lps in batch.teachers]
    return clm_and_fusion_sums(student, batch.labels, teachers, batch.metric_ce, fusion)


# A step's timings: in its event (logs, dashboard), never in what the store keeps.
_TIMINGS = ("tokens_per_s", "seconds")
# fp16 updates the loss scaler may skip in a row before training calls it divergence: from
# GradScaler's initial 2**16 to below 1 takes 17 halvings, so 25 leaves room and no more.
MAX_SCALER_OVERFLOWS = 25


# -- the loop ------------------------------------------------------------------------
def train_target(
    cfg: TrainConfig,
    *,
    pivot: ModelSpec,
    data: FusionData,
    store: ArtifactStore,
    address: str,
    lam: float | None = None,
    on_event: Callable[[Event], None] | None = None,
    name: str | None = None,
    card: dict[str, Any] | None = None,
    domains: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train one target and put it into the store at ``address``; returns its summary.

    ``pivot``: the model the target starts from (its weights, tokenizer and
    chat template). ``lam``: λ; defaults to ``cfg.lam`` (the CLM baseline
    passes 1.0). ``name``: the target's name in messages (default: its address).
    ``card``: what the model card says of the data (name → text).
    ``domains``: each training sequence's data source; with them, the training log's
    ``teachers`` says per data source how much of the source's teacher the alignment
    covered and how often the fusion function chose it (``FusionData.teacher_summary``).

    A step whose loss or gradient norm is not finite stops training with a
    ``TrainError`` before the optimizer applies it: no checkpoint is written
    after it and the target is not committed, so the last good checkpoint is
    where a rerun (with other settings) starts.
    """
    pin_compute()
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    lam = cfg.run_lam if lam is None else float(lam)
    emit = on_event or (lambda event: None)
    if store.is_complete(address):
        drop_checkpoints(store, address)  # left by a run killed between its commit and their removal
        return {"address": address, "skipped": True}

    use_teachers = lam < 1.0
    if use_teachers and data.n_teachers == 0:
        raise TrainError(f"λ = {lam} < 1 needs the source's aligned shards; only the pivot's were given")
    fusion = FUSION_FUNCTIONS.get(cfg.fusion_function) if use_teachers else None

    # the ranks wait at barriers while the main process uploads a checkpoint or the target
    group = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.collective_timeout_s))
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision), kwargs_handlers=[group])
    try:
        world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
        if cfg.batch_size % (cfg.micro_batch_size * world):
            raise TrainError(f"train.batch_size {cfg.batch_size} is not a multiple of micro_batch_size "
                             f"{cfg.micro_batch_size} × {world} processes")
        if len(data) < cfg.batch_size:
            raise TrainError(f"train.batch_size {cfg.batch_size} exceeds the {len(data)} training sequences")
        n_steps = total_steps(cfg, len(data))
        per_epoch = steps_per_epoch(len(data), cfg.batch_size)
        set_seed(cfg.seed)

        # float32 master weights on the CPU; prepare() moves them (or FSDP shards) to the device.
        model = load_causal_lm(pivot, device="cpu", dtype="float32").train()
        model.config.use_cache = False
        if data.vocab_size is not None and data.vocab_size > model.config.vocab_size:
            raise TrainError(f"representation vocab_size {data.vocab_size} exceeds the pivot model's "
                             f"{model.config.vocab_size}: the shards were not made with this pivot")
        if cfg.gradient_checkpointing:
            _checkpoint_activations(model)
        tok_ref, tok_revision = tokenizer_ref(pivot)
        if tok_ref.startswith("demo:"):  # a built demo model carries its tokenizer in its folder
            tok_ref = model_dir(pivot)
        # the pivot's tokenizer, carrying the chat template the data was rendered with
        tok_files = tokenizer_files(tok_ref, tok_revision, pivot.chat_template)
        tok = load_tokenizer(tok_ref, tok_revision)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

        # The model is wrapped (DDP, or FSDP shards) before the optimizer sees its
        # parameters, so an FSDP optimizer holds the sharded ones.
        model = accelerator.prepare(model)
        # No weight decay on biases and norm weights, as transformers' Trainer.
        decay = [p for n, p in model.named_parameters() if p.requires_grad and not _no_decay(n, p)]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and _no_decay(n, p)]
        # Fused everywhere. On a GPU, torch's default (foreach) AdamW materialises a float32
        # temporary the size of every parameter (sqrt of the second moments): 29 GB at 7B, the
        # difference between a 7B model fitting one 141 GB GPU or not. On the CPU the default is
        # the per-tensor loop, 7x slower than the fused kernel (171 vs 24 ms a step for 17M
        # parameters on one core). The kernel is elementwise, so its bytes do not depend on
        # the thread count.
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), fused=True)
        optimizer = accelerator.prepare(optimizer)
        warmup = math.ceil(cfg.warmup_ratio * n_steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, n_steps)
        # The scheduler is stepped by hand once per optimizer step: accelerate's
        # wrapper would step it once per process. Registered so save_state keeps it.
        accelerator.register_for_checkpointing(scheduler)

        # -- resume ---------------------------------------------------------------------
        start, history = 0, []
        found = complete_checkpoints(store, address)
        if found:
            step0, ck_address = found[-1]
            # One copy per node: its first process fetches and verifies (at 7B ~84 GB from S3),
            # the node's other ranks then read that folder instead of copying and hashing it again.
            with accelerator.local_main_process_first():
                local = store.fetch(ck_address) if accelerator.is_local_main_process else store.fetched_path(ck_address)
            accelerator.load_state(str(local))
            state = json.loads((Path(local) / STATE_FILE).read_text())
            accelerator.wait_for_everyone()
            if store.scheme != "file" and accelerator.is_local_main_process:
                # a copy in the node's fetch cache resumes nothing more (the next resume starts from a
                # newer checkpoint): kept, each in-pod retry would fill the disk with another 84 GB
                shutil.rmtree(local, ignore_errors=True)
            if state.get("data") != _data_fingerprint(data, cfg):
                raise TrainError(f"checkpoint {ck_address} was made from other training data or batch settings")
            start, history = int(state["step"]), list(state.get("history", []))
            if start != step0:
                raise TrainError(f"checkpoint {ck_address} holds step {start}, not {step0}")
            emit({"event": "resume", "step": start, "checkpoint": ck_address, "history": history})
        emit({"event": "start", "step": start, "total_steps": n_steps, "steps_per_epoch": per_epoch,
              "processes": world, "lam": lam, "fusion_function": cfg.fusion_function if use_teachers else None,
              "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
              "gradient_checkpointing": _checkpointing(accelerator.unwrap_model(model))})

        # -- optimizer steps ------------------------------------------------------------
        model.train()
        # fp16 updates skipped in a row (below), counted on from the checkpoint's history: a
        # resume must stop a divergent run where an uninterrupted one stops, not commit it
        overflows = next((k for k, r in enumerate(reversed(history)) if "update_skipped" not in r), len(history))
        for step in range(start, n_steps):
            stopping.check()
            t0 = time.perf_counter()
            batch_ids = global_batch(len(data), cfg.batch_size, cfg.seed, step)
            # Every supervised token of the whole step weighs the same, whichever
            # micro-batch or rank it falls in: divide sums by the step's total.
            n_sup = int(data.n_supervised[batch_ids].sum())
            if n_sup == 0:
                raise TrainError(f"step {step}: no supervised token in the global batch")
            scale = world / n_sup  # DDP averages gradients over ranks
            sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # clm, fusion, real tokens
            micro = micro_batches(batch_ids, data.lengths, cfg.micro_batch_size, rank, world)
            for i, mb in enumerate(micro):
                batch = data.collate(mb, pad_id, teachers=use_teachers).to(accelerator.device)
                sync = i == len(micro) - 1  # all-reduce gradients once, after the last micro-batch
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    clm, fuse = micro_batch_sums(model, batch, fusion=fusion, temperature=cfg.temperature,
                                                 use_teachers=use_teachers)
                    loss = clm if fuse is None else lam * clm + (1.0 - lam) * fuse
                    accelerator.backward(loss * scale)
                # kept on the device: no host sync per micro-batch
                sums[0] += clm.detach().double()
                sums[2] += batch.n_tokens
                if fuse is not None:
                    sums[1] += fuse.detach().double()
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr = scheduler.get_last_lr()[0]
            # Summed over ranks before the update, so every rank sees the same numbers and
            # a non-finite step stops all of them before it reaches the weights.
            totals = accelerator.reduce(sums, reduction="sum").cpu()
            # fp16's loss scaler starts high on purpose and finds its scale by overflowing: an
            # inf gradient norm under a finite loss is its signal, not divergence. It skips
            # that update and halves the scale; the learning rate waits for a real update
            # (as in transformers' Trainer). Too many in a row is divergence after all.
            scaled = accelerator.scaler is not None
            _require_finite(name or address, step + 1, lr, totals, grad_norm, use_teachers,
                            lambda: complete_checkpoints(store, address), gradient_may_overflow=scaled)
            scale_before = accelerator.scaler.get_scale() if scaled else None
            optimizer.step()
            # The scaler lowers its scale exactly when it skipped the update. (accelerate's
            # optimizer_step_was_skipped cannot tell under a fused optimizer: the fused kernel
            # is called and skips by itself.)
            skipped = scaled and accelerator.scaler.get_scale() < scale_before
            if skipped:
                overflows += 1
                if overflows > MAX_SCALER_OVERFLOWS:
                    raise TrainError(f"train[{name or address}]: the fp16 gradient overflowed in "
                                     f"{overflows} steps in a row, up to step {step + 1}, whatever the loss "
                                     f"scale (learning rate {lr:g}); nothing committed")
            else:
                overflows = 0
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            seconds = time.perf_counter() - t0
            clm_mean, fuse_mean = float(totals[0]) / n_sup, float(totals[1]) / n_sup
            record = {"step": step + 1, "epoch": round((step + 1) / per_epoch, 4),
                      "loss": clm_mean if not use_teachers else lam * clm_mean + (1 - lam) * fuse_mean,
                      "clm_loss": clm_mean, "fusion_loss": fuse_mean if use_teachers else None,
                      "lr": lr, "grad_norm": None if skipped else float(grad_norm), "tokens": int(totals[2]),
                      "supervised_tokens": n_sup, "tokens_per_s": float(totals[2]) / max(seconds, 1e-9),
                      "seconds": seconds}
            if skipped:
                record["update_skipped"] = "fp16 gradient overflow: loss scale lowered"
            # the stored history (training log, checkpoint state) keeps what the step computed, not
            # how fast this machine was: the same address holds the same bytes under any runner
            history.append({k: v for k, v in record.items() if k not in _TIMINGS})
            emit({"event": "step", "total_steps": n_steps, **record})

            done = step + 1
            if done % cfg.checkpoint_every == 0 and done < n_steps:  # the last step commits the target
                state = {"step": done, "total_steps": n_steps, "data": _data_fingerprint(data, cfg),
                         "data_position": {"epoch": done // per_epoch, "batch_in_epoch": done % per_epoch,
                                           "sequences_seen": done * cfg.batch_size},
                         "history": history}
                ck_address = _save_checkpoint(accelerator, store, address, done, state, cfg.keep_checkpoints)
                emit({"event": "checkpoint", "step": done, "address": ck_address})

        # -- the target: a Hugging Face folder ---------------------------------------------
        state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards on the main process
        summary: dict[str, Any] = {"address": address, "steps": n_steps, "lam": lam,
                                   "fusion_function": cfg.fusion_function if use_teachers else None,
                                   "mixed_precision": accelerator.mixed_precision,
                                   "final_loss": history[-1]["loss"] if history else None}
        if main:
            out = Path(tempfile.mkdtemp(prefix="fusechat-target-"))
            try:
                # float32: the master weights. Rounding to bf16 here would erase most
                # of a 5e-6-lr update, and VaRM weighs exactly those deltas.
                accelerator.unwrap_model(model).save_pretrained(out, state_dict=state_dict, safe_serialization=True)
                write_files(tok_files, out)
                log_ = {"train_config": cfg.model_dump(mode="json"), "lam": lam, "steps": n_steps,
                        "sequences": len(data), "history": history}
                if use_teachers and domains is not None:
                    log_["teachers"] = data.teacher_summary(domains, cfg.fusion_function)
                (out / TRAINING_LOG).write_text(json.dumps(log_, indent=1))
                (out / "README.md").write_text(target_card(
                    name=name or address.rsplit("/", 1)[-1], pivot=pivot.path, lam=lam,
                    fusion_function=summary["fusion_function"], steps=n_steps, sequences=len(data),
                    train_config=cfg.model_dump(mode="json"), data=card, pivot_folder=model_dir(pivot)))
                store.put_dir(address, out, meta={"stage": "train", **summary})
            finally:
                shutil.rmtree(out, ignore_errors=True)
            drop_checkpoints(store, address)
        accelerator.wait_for_everyone()
        emit({"event": "done", **summary})
        return summary
    finally:
        # A worker runs one target after another (and retries in-process): on a GPU, drop
        # the accelerator's hold on model and optimizer state and empty the device cache at
        # once. free_memory() always runs a full gc.collect() (0.3-0.7 s in this process, a
        # tenth of a tiny run's training); on the CPU there is no cache to empty, and the
        # model and optimizer go with this frame (no reference cycles: models.release_memory).
        if accelerator.device.type != "cpu":
            accelerator.free_memory()


def _checkpoint_activations(model: Any) -> None:
    """Recompute activations in the backward pass. transformers 5 renamed gradient checkpointing
    to activation checkpointing; the old names warn on every call and go in v6."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # a transformers 5 release before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _checkpointing(model: Any) -> bool:
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))  # before the rename


def _require_finite(name: str, step: int, lr: float, totals: torch.Tensor, grad_norm: Any,
                    use_teachers: bool, checkpoints: Callable[[], list[tuple[int, str]]], *,
                    gradient_may_overflow: bool = False) -> None:
    """One line naming the target and the step when the step's loss or gradient norm is NaN/inf.
    ``gradient_may_overflow``: under a loss scaler (fp16), whose overflow is not an error when
    the loss itself is finite (the scaler skips the update)."""
    bad = []
    if not math.isfinite(float(totals[0])):
        bad.append("loss" if not use_teachers else "CLM loss")
    if use_teachers and not math.isfinite(float(totals[1])):
        bad.append("fusion loss")
    if not math.isfinite(float(grad_norm)) and (bad or not gradient_may_overflow):
        bad.append("gradient norm")
    if not bad:
        return
    found = checkpoints()
    last = f"last good checkpoint: step {found[-1][0]}" if found else "no checkpoint yet"
    raise TrainError(f"train[{name}]: non-finite {' and '.join(bad)} at step {step} (learning rate {lr:g}); "
                     f"stopped before the update, nothing committed, {last}")


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # By name, not by shape: FSDP hands the optimizer 1-D shards of every weight.
    return name.endswith("bias") or "norm" in name.lower()


def _data_fingerprint(data: FusionData, cfg: TrainConfig) -> dict[str, Any]:
    """What the data position means: the same step is the same batch only for the same data and order."""
    h = hashlib.sha256(np.ascontiguousarray(data.lengths).tobytes())
    h.update(np.ascontiguousarray(data.n_supervised).tobytes())
    return {"n_seq": len(data), "lengths_sha256": h.hexdigest()[:16], "seed": cfg.seed,
            "batch_size": cfg.batch_size}


def _save_checkpoint(accelerator: Any, store: ArtifactStore, target_address: str, step: int,
                     state: dict[str, Any], keep: int) -> str:
    address = checkpoint_address(target_address, step)
    local = _staging_dir(address)
    if accelerator.is_main_process:
        shutil.rmtree(local, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(local))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (local / STATE_FILE).write_text(json.dumps(state, indent=1))
        store.put_dir(address, local, meta={"stage": "train-checkpoint", "step": step})
        shutil.rmtree(local, ignore_errors=True)
        # Older checkpoints go only once this one is complete.
        for _, old in complete_checkpoints(store, target_address)[:-keep]:
            store.delete(old)
    accelerator.wait_for_everyone()
    return address


# -- from a run config ------------------------------------------------------------------
def train_from_config(cfg: RunConfig, target: str, *,
                      on_event: Callable[[Event], None] | None = None) -> dict[str, Any]:
    """Train ``target`` (a source's name, or ``plan.CLM``) of a run, reading inputs from its store."""
    from fusechat_core.demo import materialise
    from fusechat_core.plan import CLM, RunPlan

    plan = RunPlan(cfg)
    store = ArtifactStore(cfg.store)
    if target not in plan.target_names() and target != CLM:
        raise TrainError(f"no target {target!r} in this run (targets: {', '.join(plan.target_names())})")
    lam = plan.target_lam(target)
    shards = cfg.represent.shards
    store.require(plan.represent(cfg.pivot))
    pivot_dirs = [store.fetch(plan.represent_shard(cfg.pivot, i)) for i in range(shards)]
    aligned_dirs = None
    if lam < 1.0:
        source = plan.model(plan.target_source(target))  # type: ignore[arg-type]
        store.require(plan.align(source))
        aligned_dirs = [store.fetch(plan.align_shard(source, i)) for i in range(shards)]
    data = FusionData(pivot_dirs, aligned_dirs, max_length=cfg.train.max_length)
    domains = None  # each training sequence's data source, for the training log's teacher summary
    if lam < 1.0 and store.is_complete(plan.dataset):  # (a store holding only shards has none)
        from fusechat_core.data.build import split_table

        domains = split_table(store, plan.dataset, columns=["source"]).column("source").to_pylist()
    materialise(plan, store)  # a demo: pivot loads from its built artifact
    # torch's generator is process-wide and set_seed reseeds it: two targets trained at
    # once in one process's worker threads would draw from each other's stream. One at a
    # time per process; parallel targets go to separate workers (Dask, deployments).
    address = plan.train(target)
    source_name = plan.target_source(target)
    card = {"data": f"dataset artifact `{plan.dataset}` (run `{cfg.name}`)",
            "teacher": "the pivot only" if lam >= 1.0 else f"the pivot and source `{source_name}` "
                                                            f"(`{plan.model(source_name).path}`)"}
    with stopping.holding(_ONE_TRAINING), _lease(store, address):
        if store.is_complete(address):  # the writer we waited for finished it
            return dict(store.require(address).meta)
        return train_target(cfg.train, pivot=cfg.pivot, data=data, store=store, address=address,
                            lam=lam, on_event=on_event, name=plan.target_label(target), card=card,
                            domains=domains)


def _lease(store: ArtifactStore, address: str) -> Any:
    """The target's write lease, held by the writing rank (the main one) for the whole training,
    so a second run of the same target waits for this one instead of training it again."""
    return store.lease(address) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()


_ONE_TRAINING = threading.Lock()


def main(argv: list[str] | None = None) -> int:
    """``[accelerate launch ...] python -m fusechat_core.train CONFIG --target NAME``.

    Prints one JSON object per event on stdout (main process only), which the
    Prefect task reads to report progress.
    """
    p = argparse.ArgumentParser(prog="python -m fusechat_core.train", description=main.__doc__.splitlines()[0])
    p.add_argument("config", help="run config (YAML, or the JSON a task wrote)")
    p.add_argument("--target", required=True, help="a source's name, or 'clm' for the λ = 1 baseline")
    p.add_argument("--store", help="artifact root URL (overrides the config's)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, store=args.store)
    rank0 = int(os.environ.get("RANK", "0")) == 0

    def emit(event: Event) -> None:
        if rank0:
            print(json.dumps(event), flush=True)

    # The task that launched this process terminates it when its run stops: stop at the
    # next step, releasing the target's lease, instead of dying holding it.
    import signal

    def _terminated(signum: int, frame: Any) -> None:
        stopping.request_stop("SIGTERM", grace=0)
        raise stopping.Stopped("SIGTERM")

    signal.signal(signal.SIGTERM, _terminated)
    try:
        train_from_config(cfg, args.target, on_event=emit)
    except (TrainError, ValueError, StoreError, ModelLoadError) as exc:
        print(f"fusechat.train: error: {exc}", file=sys.stderr)
        return 2
    except stopping.Stopped:
        print("fusechat.train: stopped (SIGTERM); checkpoints are kept", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
