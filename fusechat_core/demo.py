"""The demo's models: tiny, real, and each the expert of some domains.

A ``demo:NAME`` model in the config is built here from ``demo.models[NAME]``:
a randomly initialised tiny model of the given architecture with its real
tokenizer, pre-trained on the CPU on the synthetic world
(``fusechat_core.data.synthetic``) with that model's domain emphasis. The
result is a plain Hugging Face folder, stored as an artifact like any other,
so every later stage loads it exactly as it would load a hub model.
"""

from __future__ import annotations

import hashlib
import random
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusechat_core import stopping
from fusechat_core.chat import IGNORE, ChatFormatter
from fusechat_core.config import ModelSpec, RunConfig, demo_name
from fusechat_core.data.synthetic import DOMAINS
from fusechat_core.determinism import pin_compute
from fusechat_core.models import formatter_for
from fusechat_core.represent import head_only_supported
from fusechat_core.store import ArtifactStore

QUICK_SHARE = 4  # `fusechat demo --quick`: a quarter of the rows and of the pre-training steps


def quick_demo(cfg: RunConfig) -> RunConfig:
    """The demo's world at a quarter of its budget: the same models, tokenizers, stages and
    merges, on a quarter of each data source's rows with a quarter of each model's
    pre-training steps, fine-tuned for one epoch (about a third of the demo's time). For
    checking an installation end to end, and for CI; its experts are weaker and its held-out
    set a quarter of the size, so the demo's figures are the full run's. (Its pivot, 38 steps
    from random, is still far from every domain: fine-tuning it for the demo's three epochs
    took plain fine-tuning past the averaged targets, measured: VaRM −0.0063 [−0.0110, −0.0018]
    at three epochs, +0.0108 [+0.0088, +0.0137] at one.) Named ``demo-quick``; its addresses
    differ from the demo's, so both can share a store."""
    if cfg.demo is None:
        raise ValueError("quick_demo: the config has no demo section")
    models = {name: m.model_copy(update={"steps": -(-m.steps // QUICK_SHARE)}) for name, m in cfg.demo.models.items()}
    sources = [s.model_copy(update={"count": -(-s.count // QUICK_SHARE)}) if s.count else s for s in cfg.data.sources]
    return cfg.model_copy(update={"name": f"{cfg.name}-quick",
                                  "demo": cfg.demo.model_copy(update={"models": models}),
                                  "data": cfg.data.model_copy(update={"sources": sources}),
                                  "train": cfg.train.model_copy(update={"epochs": 1})})


def _rng(*parts: Any) -> random.Random:
    return random.Random(int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:16], 16))


def _batch(formatter: ChatFormatter, rng: random.Random, domains: list[str], weights: list[float],
           size: int, max_length: int, pad_id: int) -> tuple[Any, Any, Any]:
    import torch

    rows = []
    for _ in range(size):
        q, a = DOMAINS.get(rng.choices(domains, weights)[0])(rng)
        r = formatter.encode([{"from": "human", "value": q}, {"from": "gpt", "value": a}], max_length)
        rows.append((r.input_ids, r.labels))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((size, width), pad_id, dtype=torch.long)
    labels = torch.full((size, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


def _supervised_loss(model: Any, ids: Any, mask: Any, labels: Any, head_only: bool) -> Any:
    """Mean next-token cross-entropy over the supervised (assistant) tokens.

    Only a few tokens per conversation are supervised, and a tekken head has 131,072
    rows: applying the head at those positions alone is the same loss at a fraction of
    the cost of the full batch × length × vocabulary logits.
    """
    import torch

    if not head_only:
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    b, t = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    logits = model.get_output_embeddings()(hidden[b, t])
    return torch.nn.functional.cross_entropy(logits.float(), labels[b, t + 1])


def pretrain_demo_model(run: RunConfig, spec: ModelSpec, out_dir: Path,
                        progress: Callable[[str], None] | None = None,
                        on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Build and pre-train one demo model into ``out_dir``; returns its training summary.
    ``on_step(done, total)``: called after every optimizer step."""
    pin_compute()
    import torch

    from fusechat_core.models import warm_imports
    from fusechat_core.tiny import build_tiny_model

    warm_imports()  # transformers' lazy module is not safe to resolve from two threads at once
    from transformers import AutoModelForCausalLM

    assert run.demo is not None and spec.tokenizer is not None
    name = demo_name(spec.path)
    d = run.demo.models[name]
    seed = int(hashlib.sha256(f"{run.demo.seed}:{name}".encode()).hexdigest()[:8], 16)
    build_tiny_model(d.arch, spec.tokenizer, out_dir, seed=seed, chat_template=spec.chat_template,
                     hidden=d.hidden, layers=d.layers, heads=d.heads, kv_heads=d.kv_heads,
                     intermediate=d.intermediate, max_positions=max(run.demo.max_length, 512))
    # Pre-trained in the very rendering every later stage uses for this spec (the
    # folder's tokenizer carries the same template, for evaluation).
    formatter = formatter_for(spec)
    tok = formatter.tokenizer
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    model.train()
    # fused: the per-tensor default spends a third of a tekken model's step in the optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=d.learning_rate or run.demo.learning_rate, weight_decay=0.0,
                            fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / max(d.steps, 1)))
    rng = _rng(run.demo.seed, "pretrain", name)
    domains = sorted(d.domains)
    weights = [d.domains[k] for k in domains]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    head_only = head_only_supported(model)
    losses = []
    for step in range(d.steps):
        stopping.check()
        ids, labels, mask = _batch(formatter, rng, domains, weights, run.demo.batch_size,
                                   run.demo.max_length, pad)
        loss = _supervised_loss(model, ids, mask, labels, head_only)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, d.steps)
        if progress and (step + 1) % 50 == 0:
            progress(f"demo model {name}: step {step + 1}/{d.steps}, loss {sum(losses[-50:]) / 50:.3f}")
    model.eval()
    model.save_pretrained(out_dir)
    return {"model": name, "arch": d.arch, "steps": d.steps, "params": sum(p.numel() for p in model.parameters()),
            "final_loss": sum(losses[-20:]) / max(len(losses[-20:]), 1), "domains": d.domains}


# Pre-training draws on torch's process-wide generator (reseeded per model) and is
# measurably not a function of its seed when another thread reseeds it meanwhile: the
# demo models of one process are built one at a time (on 2 cores, concurrency gained 15%).
_ONE_PRETRAINING = threading.Lock()


def build_demo_model_artifact(run: RunConfig, spec: ModelSpec, store: ArtifactStore, address: str,
                              progress: Callable[[str], None] | None = None,
                              on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        with stopping.holding(_ONE_PRETRAINING):
            summary = pretrain_demo_model(run, spec, Path(tmp), progress, on_step)
        store.put_dir(address, tmp, meta={"stage": "demo_models", **summary})
    return summary


def materialise(plan: Any, store: ArtifactStore) -> None:
    """Make this run's demo models loadable in this process (fetched once per content)."""
    from fusechat_core.models import register_built_model

    for spec in plan.demo_specs():
        register_built_model(spec.path, str(store.fetch(plan.demo_model(spec))))
