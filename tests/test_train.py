"""The training loop on tiny real models: CLM baseline, fusion, resume after SIGKILL.

Inputs are built here in the REPRESENTATION / ALIGNED contract format from
tiny models run over synthetic chats, so these tests do not depend on the
represent and align stages being finished.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fusechat_core.chat import IGNORE, ChatFormatter
from fusechat_core.config import ModelSpec, TrainConfig
from fusechat_core.data import synthetic
from fusechat_core.fuse.batches import ContractError, FusionData
from fusechat_core.models import load_causal_lm
from fusechat_core.store import ArtifactStore
from fusechat_core.tiny import build_tiny_model
from fusechat_core.train import TRAINING_LOG, complete_checkpoints, global_batch, micro_batches, train_target

REPO = Path(__file__).resolve().parents[1]
N_ROWS, SHARDS, TOP_K, MAX_LEN = 24, 2, 8, 96


def _rows(n: int = N_ROWS) -> list[dict]:
    rows = list(synthetic.generate("markov", n // 2, 3)) + list(synthetic.generate("arithmetic", n - n // 2, 3))
    return [{"id": f"r{i}", **r} for i, r in enumerate(rows)]


@torch.no_grad()
def _model_outputs(model_dir: Path, rows: list[dict]) -> list[dict]:
    """Per sequence: ids, supervised positions, top-k at those positions, CE: a model's teacher forcing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    fmt = ChatFormatter(tok)
    out = []
    for row in rows:
        r = fmt.encode(row["conversations"], MAX_LEN)
        ids = torch.tensor(r.input_ids)
        sup = torch.tensor([t for t in range(1, len(ids)) if r.labels[t] != IGNORE])
        logp = torch.log_softmax(model(ids[None]).logits[0].float(), -1)[sup - 1]
        top = logp.topk(TOP_K, dim=-1)
        out.append({"ids": ids, "sup": sup, "top_ids": top.indices, "top_lp": top.values,
                    "ce": float(-logp.gather(-1, ids[sup][:, None]).mean())})
    return out


def _write_shards(store: ArtifactStore, prefix: str, outs: list[dict], rows: list[dict], *, aligned: bool,
                  vocab: int = 32000) -> list[Path]:
    """Contract shards: contiguous row ranges [i*n//N, (i+1)*n//N), dataset order."""
    from safetensors.torch import save

    n = len(outs)
    folders = []
    for i in range(SHARDS):
        part = outs[i * n // SHARDS:(i + 1) * n // SHARDS]
        sup_off = np.cumsum([0] + [len(o["sup"]) for o in part])
        t = {"sup_offsets": torch.tensor(sup_off, dtype=torch.int64),
             "topk_logprobs": torch.cat([o["top_lp"] for o in part]).half(),
             "metric_ce": torch.tensor([o["ce"] for o in part], dtype=torch.float32)}
        if aligned:
            t["topk_ids"] = torch.cat([o["top_ids"] for o in part]).to(torch.int32)
            t["fallback"] = torch.cat([o.get("fallback", torch.zeros(len(o["sup"]), dtype=torch.bool))
                                       for o in part])
            name = "aligned.safetensors"
        else:
            t["topk_ids"] = torch.cat([o["top_ids"] for o in part]).to(torch.uint16)
            t["input_ids"] = torch.cat([o["ids"] for o in part]).to(torch.uint16)
            t["seq_offsets"] = torch.tensor(np.cumsum([0] + [len(o["ids"]) for o in part]), dtype=torch.int64)
            t["sup_positions"] = torch.cat([o["sup"] for o in part]).to(torch.uint16)
            name = "representation.safetensors"
        address = f"{prefix}/shard-{i:05d}-of-{SHARDS:05d}"
        meta = {"vocab_size": vocab, "top_k": TOP_K, "shard": i, "shards": SHARDS, "n_seq": len(part),
                "row_ids": [r["id"] for r in rows[i * n // SHARDS:(i + 1) * n // SHARDS]]}
        with store.writer(address) as w:
            w.write_bytes(name, save(t))
            w.write_json("meta.json", meta)
        folders.append(store.fetch(address))
    return folders


@pytest.fixture(scope="module")
def fusion_inputs(tiny_models, tmp_path_factory):
    """Pivot representation + a source (another tiny Mistral, same tokenizer) aligned: identity alignment."""
    root = tmp_path_factory.mktemp("fusion-inputs")
    source_dir = build_tiny_model("mistral", "builtin:mistral-v1", root / "source", seed=11)
    rows = _rows()
    store = ArtifactStore(f"file://{root / 'store'}")
    pivot_out = _model_outputs(tiny_models["pivot"], rows)
    source_out = _model_outputs(source_dir, rows)
    pivot_dirs = _write_shards(store, "represent/pivot-t", pivot_out, rows, aligned=False)
    aligned_dirs = _write_shards(store, "align/source-t", source_out, rows, aligned=True)
    return {"pivot": ModelSpec(name="pivot", path=str(tiny_models["pivot"])), "pivot_dirs": pivot_dirs,
            "aligned_dirs": aligned_dirs,
            "pivot_out": pivot_out, "source_out": source_out, "root": root}


def _cfg(**kw) -> TrainConfig:
    base = dict(learning_rate=2e-3, batch_size=8, micro_batch_size=4, max_steps=6, warmup_ratio=0.2,
                checkpoint_every=2, mixed_precision="no", seed=5, max_length=MAX_LEN)
    return TrainConfig(**{**base, **kw})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# -- the data reader follows the contract ----------------------------------------------
def test_fusion_data_reads_the_contract(fusion_inputs):
    data = FusionData(fusion_inputs["pivot_dirs"], fusion_inputs["aligned_dirs"], max_length=MAX_LEN)
    assert len(data) == N_ROWS and data.row_ids == [f"r{i}" for i in range(N_ROWS)]
    g = [13, 2]  # one sequence from each shard
    batch = data.collate(g, pad_id=0)
    for b, idx in enumerate(g):
        po, so = fusion_inputs["pivot_out"][idx], fusion_inputs["source_out"][idx]
        n = len(po["ids"])
        assert torch.equal(batch.input_ids[b, :n], po["ids"]) and int(batch.attention_mask[b].sum()) == n
        rows = batch.sup_batch == b
        assert torch.equal(batch.sup_pos[rows], po["sup"])
        assert torch.equal(batch.labels[rows], po["ids"][po["sup"]])
        assert torch.equal(batch.teachers[0][0][rows], po["top_ids"])
        assert torch.equal(batch.teachers[1][0][rows], so["top_ids"])
        assert torch.allclose(batch.metric_ce[rows], torch.tensor([po["ce"], so["ce"]]))
    # the top-k tables stay in their files: a step copies only its own rows out of the mapping
    assert all(isinstance(sh.topk_ids, np.memmap) and isinstance(sh.topk_logprobs, np.memmap)
               for sh in data.pivot + data.aligned)


def test_truncation_drops_supervised_rows_beyond_max_length(fusion_inputs):
    cut = 30
    data = FusionData(fusion_inputs["pivot_dirs"], max_length=cut)
    for g, o in enumerate(fusion_inputs["pivot_out"]):
        assert data.lengths[g] == min(len(o["ids"]), cut)
        assert data.n_supervised[g] == int((o["sup"] < cut).sum())
    batch = data.collate(list(range(N_ROWS)), pad_id=0)
    assert int(batch.sup_pos.max()) < cut and len(batch.labels) == int(data.n_supervised.sum())


def test_aligned_shards_from_other_positions_are_rejected(fusion_inputs):
    with pytest.raises(ContractError, match="sup_offsets differ"):
        FusionData(fusion_inputs["pivot_dirs"], fusion_inputs["aligned_dirs"][::-1])


def test_broken_shards_are_contract_errors_naming_the_file(fusion_inputs, tmp_path):
    import shutil

    pivot = [shutil.copytree(p, tmp_path / f"pivot-{i}") for i, p in enumerate(fusion_inputs["pivot_dirs"])]
    aligned = [shutil.copytree(p, tmp_path / f"aligned-{i}") for i, p in enumerate(fusion_inputs["aligned_dirs"])]
    file = aligned[1] / "aligned.safetensors"
    file.write_bytes(file.read_bytes()[:-8])
    with pytest.raises(ContractError, match="aligned-1/aligned.safetensors: unreadable"):
        FusionData(pivot, aligned)
    (pivot[0] / "representation.safetensors").unlink()
    with pytest.raises(ContractError, match="pivot-0/representation.safetensors: unreadable"):
        FusionData(pivot)


# -- data order -------------------------------------------------------------------------
def test_data_order_is_a_function_of_seed_and_step():
    n, bs = 10, 4  # 3 steps per epoch; the last one wraps to the start of the same order
    epoch0 = [global_batch(n, bs, 1, s) for s in range(3)]
    flat = [i for b in epoch0 for i in b]
    assert sorted(set(flat)) == list(range(n)) and flat[10:] == flat[:2]
    assert global_batch(n, bs, 1, 1) == epoch0[1] and global_batch(n, bs, 2, 0) != epoch0[0]
    assert global_batch(n, bs, 1, 3) != epoch0[0]  # a new epoch reshuffles
    lengths = np.array([5, 9, 1, 7, 3, 8, 2, 6, 4, 0])
    ranks = [micro_batches(list(range(8)), lengths, 2, rank=r, world=2) for r in range(2)]
    # by length 9,8,7,6,5,3,2,1 = ids 1,5,3,7,0,4,6,2, dealt round-robin
    assert ranks[0] == [[1, 3], [0, 6]] and ranks[1] == [[5, 7], [4, 2]]


# -- λ = 1 is plain CLM fine-tuning, exactly ------------------------------------------------
def _reference_clm(cfg: TrainConfig, pivot: Path, data: FusionData) -> dict[str, torch.Tensor]:
    """Plain fine-tuning written independently: the model's own labels loss, a bare torch loop."""
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(pivot, dtype=torch.float32)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.learning_rate, betas=cfg.adam_betas,
                            fused=True)  # the trainer's optimizer (its kernel rounds unlike the per-tensor loop)
    steps = cfg.max_steps
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * steps), steps)
    model.train()
    for step in range(steps):
        ids = global_batch(len(data), cfg.batch_size, cfg.seed, step)
        (mb,) = micro_batches(ids, data.lengths, cfg.micro_batch_size)  # one micro-batch per step
        b = data.collate(mb, pad_id=0, teachers=False)
        labels = torch.full_like(b.input_ids, -100)
        labels[b.sup_batch, b.sup_pos] = b.input_ids[b.sup_batch, b.sup_pos]
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lambda_one_is_plain_clm_fine_tuning(fusion_inputs, tmp_path):
    cfg = _cfg(micro_batch_size=8, max_steps=4, checkpoint_every=100)
    data = FusionData(fusion_inputs["pivot_dirs"], max_length=MAX_LEN)  # no teacher inputs at all
    store = ArtifactStore(f"file://{tmp_path}")
    train_target(cfg, pivot=fusion_inputs["pivot"], data=data, store=store, address="train/clm-t", lam=1.0)
    ours = _weights(store.fetch("train/clm-t"))
    ref = _reference_clm(cfg, Path(fusion_inputs["pivot"].path), data)
    start = _weights(Path(fusion_inputs["pivot"].path))
    moved = 0
    for name, w in ref.items():
        assert torch.equal(ours[name], w), name
        moved += not torch.equal(w, start[name])
    assert moved > 0.9 * len(ref)  # training did change the weights


# -- fusion ---------------------------------------------------------------------------------
def test_fusion_loss_decreases_and_target_is_a_complete_hf_folder(fusion_inputs, tmp_path, gc_collections):
    cfg = _cfg(max_steps=12, checkpoint_every=5, keep_checkpoints=1, warmup_ratio=0.0, lam=0.5)
    data = FusionData(fusion_inputs["pivot_dirs"], fusion_inputs["aligned_dirs"], max_length=MAX_LEN)
    store = ArtifactStore(f"file://{tmp_path}")
    events, kept = [], {}
    domains = ["markov"] * (N_ROWS // 2) + ["arithmetic"] * (N_ROWS - N_ROWS // 2)  # as _rows() makes them

    def on_event(e):
        events.append(e)
        if e["event"] == "checkpoint":  # what the store holds right after each checkpoint
            kept[e["step"]] = ([s for s, _ in complete_checkpoints(store, "train/src-t")],
                               {f.path for f in store.manifest(e["address"]).files})

    train_target(cfg, pivot=fusion_inputs["pivot"], data=data, store=store, address="train/src-t",
                 on_event=on_event, domains=domains)
    assert gc_collections == []  # on the CPU, model and optimizer go by refcount (models.release_memory)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 13))
    fuse = [e["fusion_loss"] for e in steps]
    # 12 steps over 3 epochs: compare the same batches one and two epochs apart
    per_epoch = 3
    for s in range(per_epoch):
        assert fuse[s + 2 * per_epoch] < fuse[s] - 0.5, (s, fuse)
    assert all(e["lr"] > 0 and e["tokens_per_s"] > 0 and e["tokens"] > 0 for e in steps)
    # the loss reported is λ·CLM + (1-λ)·fusion
    assert all(abs(e["loss"] - (0.5 * e["clm_loss"] + 0.5 * e["fusion_loss"])) < 1e-9 for e in steps)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = store.fetch("train/src-t")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    # the stored log keeps what each step computed, not this machine's speed (same address, same bytes)
    logged = json.loads((folder / "fusechat_training.json").read_text())["history"]
    assert [h["step"] for h in logged] == list(range(1, 13))
    assert not {"tokens_per_s", "seconds"} & {k for h in logged for k in h}
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template and len(tok) == 32000
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "mistral"
    # checkpoints at 5 and 10, none at the end (12: the target is committed instead); only the
    # newest is kept, beside the model folder, with the optimizer's state; once the target is
    # committed they are all gone (~87 GB of optimizer state at 7B resumes nothing then)
    assert {k: v[0] for k, v in kept.items()} == {5: [5], 10: [10]}
    assert "optimizer.bin" in kept[10][1]
    assert complete_checkpoints(store, "train/src-t") == []
    assert not (Path(store.root) / "train/src-t.checkpoints").exists()
    assert not any("checkpoint" in p.as_posix() for p in folder.rglob("*")), "no checkpoint in the model folder"
    assert not [f.path for f in store.manifest("train/src-t").files if f.path.endswith((".pkl", ".bin"))]
    assert store.manifest("train/src-t").meta["mixed_precision"] == "no"  # what ran, recorded
    # a Hub model card: base model, λ and the fusion function
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert "mince" in card.data.tags and "fusechat" in card.data.tags
    assert "λ: 0.5" in card.text and "fusion function: mince" in card.text
    assert f"base model (pivot): `{fusion_inputs['pivot'].path}` (a local model" in card.text
    # a local folder that records no hub id is no Hub base_model (nor has a relation to one)
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    ck = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert ck == [5, 10]
    # the training log says what the source gave: identity alignment covers every row; MinCE took
    # the source where its CE of the sequence was the lower (counted here from the models' own CEs)
    teachers = json.loads((folder / TRAINING_LOG).read_text())["teachers"]
    assert teachers["coverage"] == 1.0 and teachers["fusion_function"] == "mince"
    for d in ("markov", "arithmetic"):
        mine = [i for i, x in enumerate(domains) if x == d]
        won = sum(fusion_inputs["source_out"][i]["ce"] < fusion_inputs["pivot_out"][i]["ce"] for i in mine)
        assert teachers["domains"][d]["source_chosen"] == pytest.approx(won / len(mine))
        assert teachers["domains"][d]["sequences"] == len(mine)


def test_a_committed_target_leaves_no_checkpoints_behind(fusion_inputs, tmp_path):
    """A run killed between committing its target and deleting its checkpoints: the next
    start finds the target done and deletes them (complete and torn ones alike)."""
    store = ArtifactStore(f"file://{tmp_path}")
    with store.writer("train/done-t") as w:
        w.write_bytes("model.safetensors", b"weights")
    with store.writer("train/done-t.checkpoints/checkpoint-0000004") as w:
        w.write_bytes("optimizer.bin", b"state")
    torn = Path(store.root) / "train/done-t.checkpoints/checkpoint-0000006"
    torn.mkdir(parents=True)
    (torn / "optimizer.bin").write_bytes(b"half")
    out = train_target(_cfg(), pivot=fusion_inputs["pivot"], data=FusionData(fusion_inputs["pivot_dirs"]),
                       store=store, address="train/done-t")
    assert out == {"address": "train/done-t", "skipped": True}
    assert not (Path(store.root) / "train/done-t.checkpoints").exists() and store.is_complete("train/done-t")


def test_teacher_summary_counts_coverage_and_mince_choices_per_data_source(tmp_path):
    """On synthetic contract shards: label fallbacks and CEs chosen by hand, ties included."""
    g = torch.Generator().manual_seed(0)
    n, domains = 10, ["a", "b", "b", "a", "c", "a", "b", "c", "c", "a"]
    rows = [{"id": f"s{i}"} for i in range(n)]
    pivot, source = [], []
    for i in range(n):
        length = 6 + i % 4
        ids = torch.randint(5, 100, (length,), generator=g)
        sup = torch.arange(2, length) if i != 4 else torch.arange(2, 2)  # row 4: no supervised token
        top = torch.randint(0, 100, (len(sup), TOP_K), generator=g)
        lp = -torch.rand(len(sup), TOP_K, generator=g)
        fb = torch.tensor([(i + k) % 3 == 0 for k in range(len(sup))], dtype=torch.bool)
        ce_p = 1.0 + 0.1 * i
        ce_s = {0: ce_p - 0.5, 1: ce_p + 0.5, 2: ce_p, 3: ce_p - 0.1}[i % 4]  # i % 4 == 2: a tie
        pivot.append({"ids": ids, "sup": sup, "top_ids": top, "top_lp": lp, "ce": ce_p})
        source.append({"ids": ids, "sup": sup, "top_ids": top, "top_lp": lp, "ce": ce_s, "fallback": fb})
    store = ArtifactStore(f"file://{tmp_path}")
    data = FusionData(_write_shards(store, "represent/p", pivot, rows, aligned=False),
                      _write_shards(store, "align/s", source, rows, aligned=True))
    got = data.teacher_summary(domains, "mince")
    for d in "abc":
        mine = [i for i in range(n) if domains[i] == d and len(source[i]["sup"])]
        total = sum(len(source[i]["fallback"]) for i in mine)
        covered = sum(int((~source[i]["fallback"]).sum()) for i in mine)
        chosen = sum(source[i]["ce"] < pivot[i]["ce"] for i in mine)  # a tie stays with the pivot
        assert got["domains"][d] == {"sequences": len(mine), "rows": total, "coverage": pytest.approx(covered / total),
                                     "source_chosen": pytest.approx(chosen / len(mine))}
    assert got["rows"] == sum(len(o["sup"]) for o in source)
    assert "source_chosen" not in data.teacher_summary(domains, "avgce")["domains"]["a"]
    assert FusionData(_write_shards(store, "represent/p2", pivot, rows, aligned=False)).teacher_summary(
        domains, "mince") == {}
    with pytest.raises(ValueError, match="3 data sources given for 10 training sequences"):
        data.teacher_summary(domains[:3], "mince")


def test_gradient_checkpointing_gives_the_same_losses_gradients_and_weights(fusion_inputs, tmp_path):
    """Recomputing activations in the backward pass (what lets 7B × 2048 fit one GPU) is the
    same arithmetic: losses, gradient norms and trained weights agree with a run that keeps
    every activation, to float32 rounding."""
    cfg = _cfg(max_steps=3, checkpoint_every=100, lam=0.5)
    data = FusionData(fusion_inputs["pivot_dirs"], fusion_inputs["aligned_dirs"], max_length=MAX_LEN)
    store = ArtifactStore(f"file://{tmp_path}")
    runs = {}
    for on in (False, True):
        events = []
        train_target(cfg.model_copy(update={"gradient_checkpointing": on}), pivot=fusion_inputs["pivot"], data=data,
                     store=store, address=f"train/gc-{on}", on_event=events.append)
        start = next(e for e in events if e["event"] == "start")
        assert start["gradient_checkpointing"] is on  # the flag reached the model
        runs[on] = ([e for e in events if e["event"] == "step"], _weights(store.fetch(f"train/gc-{on}")))
    (plain, w_plain), (ckpt, w_ckpt) = runs[False], runs[True]
    assert len(plain) == len(ckpt) == 3
    for a, b in zip(plain, ckpt):
        for key in ("loss", "clm_loss", "fusion_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    start = _weights(Path(fusion_inputs["pivot"].path))
    for name, w in w_plain.items():
        assert not torch.equal(w, start[name]) or "norm" in name  # training moved the weights
        torch.testing.assert_close(w_ckpt[name], w, rtol=1e-5, atol=1e-6)


def test_unknown_fusion_function_and_missing_teachers_fail_clearly(fusion_inputs, tmp_path):
    store = ArtifactStore(f"file://{tmp_path}")
    pivot_only = FusionData(fusion_inputs["pivot_dirs"])
    with pytest.raises(RuntimeError, match="aligned shards"):
        train_target(_cfg(), pivot=fusion_inputs["pivot"], data=pivot_only, store=store, address="train/x")
    both = FusionData(fusion_inputs["pivot_dirs"], fusion_inputs["aligned_dirs"])
    with pytest.raises(KeyError, match="unknown fusion function 'maxce'"):
        train_target(_cfg(fusion_function="maxce"), pivot=fusion_inputs["pivot"], data=both, store=store,
                     address="train/x")


# -- a non-finite step stops training -------------------------------------------------------
def test_a_huge_learning_rate_stops_at_the_first_non_finite_step(fusion_inputs, tmp_path):
    """A finite config (no check can refuse 1e30) whose first update overflows the weights."""
    cfg = _cfg(learning_rate=1e30, warmup_ratio=0.0, checkpoint_every=1, max_steps=6)
    data = FusionData(fusion_inputs["pivot_dirs"], max_length=MAX_LEN)
    store = ArtifactStore(f"file://{tmp_path}")
    events: list[dict] = []
    with pytest.raises(RuntimeError) as err:
        train_target(cfg, pivot=fusion_inputs["pivot"], data=data, store=store, address="train/clm-t", lam=1.0,
                     on_event=events.append, name="clm")
    steps = [e for e in events if e["event"] == "step"]
    assert steps and all(math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"]) for e in steps), str(err.value)
    bad = len(steps) + 1
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"train[clm]: non-finite loss and gradient norm at step {bad} ")
    cosine = 1e30 * 0.5 * (1 + math.cos(math.pi * (bad - 1) / 6))  # the schedule's rate at that step
    assert f"(learning rate {cosine:g})" in msg and f"last good checkpoint: step {bad - 1}" in msg
    # every good step was checkpointed, nothing after the bad one; no target was committed
    assert [s for s, _ in complete_checkpoints(store, "train/clm-t")] == [bad - 1] == [steps[-1]["step"]]
    assert not store.is_complete("train/clm-t")


@pytest.fixture
def cpu_loss_scaler(monkeypatch):
    """fp16 as on a GPU, on this CPU: accelerate gives a CPU no loss scaler, so each Accelerator
    made for fp16 gets torch's own GradScaler (the one it uses on CUDA) with the options set
    here: a start far too high, as fp16 training's always is (2**16 for 7B losses)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    options: dict = {}
    init = Accelerator.__init__
    # accelerate keeps one precision per process: the tests before this one set "no"
    AcceleratorState._reset_state(reset_partial_state=True)

    def with_scaler(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.state.mixed_precision == "fp16":
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu", **options)

    monkeypatch.setattr(Accelerator, "__init__", with_scaler)
    yield options
    AcceleratorState._reset_state(reset_partial_state=True)


def test_fp16_loss_scale_overflows_skip_the_update_and_training_goes_on(fusion_inputs, tmp_path, cpu_loss_scaler):
    cpu_loss_scaler.update(init_scale=2.0 ** 24)  # fp16 gradients overflow (65504) at this scale
    cfg = _cfg(mixed_precision="fp16", max_steps=8, warmup_ratio=0.5, checkpoint_every=100)
    data = FusionData(fusion_inputs["pivot_dirs"], max_length=MAX_LEN)
    store = ArtifactStore(f"file://{tmp_path}")
    events: list[dict] = []
    train_target(cfg, pivot=fusion_inputs["pivot"], data=data, store=store, address="train/fp16", lam=1.0,
                 on_event=events.append, name="clm")
    steps = [e for e in events if e["event"] == "step"]
    skipped = [e["step"] for e in steps if e.get("update_skipped")]
    assert len(steps) == 8 and skipped and skipped == list(range(1, len(skipped) + 1)) and len(skipped) < 8
    assert all(e["grad_norm"] is None for e in steps[:len(skipped)])
    assert all(math.isfinite(e["grad_norm"]) for e in steps[len(skipped):])
    # the schedule waits for real updates: the first real one gets warmup's first rate, as step 1 did
    rates = [e["lr"] for e in steps]
    assert rates[:len(skipped) + 1] == [rates[0]] * (len(skipped) + 1) and rates[len(skipped) + 1] > rates[0]
    assert store.is_complete("train/fp16")
    # skipped updates left the weights alone: the trained target moved from the pivot, and only by real updates
    pivot = load_causal_lm(fusion_inputs["pivot"], device="cpu", dtype="float32").state_dict()
    got = _weights(store.fetch("train/fp16"))
    assert any(not torch.equal(got[k], pivot[k]) for k in got)


def test_fp16_overflow_in_every_step_is_divergence(fusion_inputs, tmp_path, cpu_loss_scaler):
    from fusechat_core.train import MAX_SCALER_OVERFLOWS

    # a scale that barely comes down: the gradient overflows step after step
    cpu_loss_scaler.update(init_scale=2.0 ** 127, backoff_factor=0.999)
    cfg = _cfg(mixed_precision="fp16", max_steps=MAX_SCALER_OVERFLOWS + 5, warmup_ratio=0.0, checkpoint_every=100)
    data = FusionData(fusion_inputs["pivot_dirs"], max_length=MAX_LEN)
    store = ArtifactStore(f"file://{tmp_path}")
    with pytest.raises(RuntimeError) as err:
        train_target(cfg, pivot=fusion_inputs["pivot"], data=data, store=store, address="train/fp16-bad",
                     lam=1.0, name="clm")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"train[clm]: the fp16 gradient overflowed in "
                                              f"{MAX_SCALER_OVERFLOWS + 1} steps in a row, up to step "
                                              f"{MAX_SCALER_OVERFLOWS + 1}")
    assert not store.is_complete("train/fp16-bad")


def test_a_resume_counts_fp16_overflows_on_from_its_checkpoint(fusion_inputs, tmp_path, cpu_loss_scaler):
    """Overflow after overflow, interrupted after a checkpoint at step 10: the resumed run stops
    at the same step as an uninterrupted one (26), where counting from 0 again trained on to
    step 30 and committed a target whose every update was skipped."""
    from fusechat_core.train import MAX_SCALER_OVERFLOWS

    cpu_loss_scaler.update(init_scale=2.0 ** 127, backoff_factor=0.999)
    cfg = _cfg(mixed_precision="fp16", max_steps=MAX_SCALER_OVERFLOWS + 5, warmup_ratio=0.0, checkpoint_every=10)
    store = ArtifactStore(f"file://{tmp_path}")

    class Preempted(Exception):
        pass

    def preempt(event: dict) -> None:
        if event["event"] == "step" and event["step"] == 12:
            raise Preempted

    def train(**kw):
        data = FusionData(fusion_inputs["pivot_dirs"], max_length=MAX_LEN)
        return train_target(cfg, pivot=fusion_inputs["pivot"], data=data, store=store, address="train/fp16-resume",
                            lam=1.0, name="clm", **kw)

    with pytest.raises(Preempted):
        train(on_event=preempt)
    assert [s for s, _ in complete_checkpoints(store, "train/fp16-resume")] == [10]
    with pytest.raises(RuntimeError) as err:
        train()
    assert str(err.value).startswith(f"train[clm]: the fp16 gradient overflowed in {MAX_SCALER_OVERFLOWS + 1} "
                                     f"steps in a row, up to step {MAX_SCALER_OVERFLOWS + 1}")
    assert not store.is_complete("train/fp16-resume")


@pytest.mark.parametrize("value", [float("inf"), float("nan"), None])
def test_a_poisoned_teacher_is_refused_when_its_rows_are_read(fusion_inputs, tmp_path, value):
    """A +inf (or NaN) in one aligned shard's log-probs is no log-prob (+inf would turn the
    teacher's distribution into NaN): training stops at the first step that reads that
    sequence, with one line naming the shard and the row; the last good checkpoint stays."""
    store = ArtifactStore(f"file://{tmp_path}")
    cfg = _cfg(checkpoint_every=2, max_steps=9, keep_checkpoints=5, lam=0.5)
    # a sequence first read by the third step (index 2) of the seeded data order
    poisoned_seq = global_batch(N_ROWS, cfg.batch_size, cfg.seed, 2)[0]
    assert all(poisoned_seq not in global_batch(N_ROWS, cfg.batch_size, cfg.seed, s) for s in (0, 1))
    outs = [dict(o) for o in fusion_inputs["source_out"]]
    outs[poisoned_seq]["top_lp"] = outs[poisoned_seq]["top_lp"].clone()
    if value is None:  # a row with no candidate at all
        outs[poisoned_seq]["top_lp"][1, :] = float("-inf")
    else:
        outs[poisoned_seq]["top_lp"][1, 0] = value
    outs[poisoned_seq]["ce"] = 0.0  # the best teacher by its metric: MinCE picks it
    aligned = _write_shards(store, "align/poisoned", outs, _rows(), aligned=True)
    data = FusionData(fusion_inputs["pivot_dirs"], aligned, max_length=MAX_LEN)
    shard, per_shard = divmod(poisoned_seq, N_ROWS // SHARDS)
    first = shard * (N_ROWS // SHARDS)  # the row: the shard's supervised rows before the sequence, then 1
    row = sum(len(o["sup"]) for o in outs[first:poisoned_seq]) + 1
    events: list[dict] = []
    with pytest.raises(ContractError) as err:
        train_target(cfg, pivot=fusion_inputs["pivot"], data=data, store=store, address="train/src-p",
                     on_event=events.append, name="target-src")
    msg = str(err.value)
    what = ("-inf everywhere: no candidate has any probability" if value is None
            else f"{value}, not a log-prob (finite or -inf)")
    assert "\n" not in msg and msg == (f"{aligned[shard] / 'aligned.safetensors'}: topk_logprobs row {row} "
                                       f"(sequence {per_shard}) is {what}")
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]
    assert [s for s, _ in complete_checkpoints(store, "train/src-p")] == [2]
    assert not store.is_complete("train/src-p")


# -- preemption: SIGKILL, resume, identical weights ----------------------------------------
_CHILD = textwrap.dedent("""
    import json, sys
    from fusechat_core.config import ModelSpec, TrainConfig
    from fusechat_core.fuse.batches import FusionData
    from fusechat_core.store import ArtifactStore
    from fusechat_core.train import train_target
    a = json.loads(sys.argv[1])
    data = FusionData(a["pivot_dirs"], a["aligned_dirs"], max_length=a["max_length"])
    train_target(TrainConfig(**a["cfg"]), pivot=ModelSpec(name="pivot", path=a["pivot"]), data=data,
                 store=ArtifactStore(a["store"]), address="train/kill-t",
                 on_event=lambda e: print(json.dumps(e), flush=True))
""")


def _child(args: dict, env_extra: dict | None = None, kill_when=None) -> tuple[int, list[dict]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    events = []
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("{"):
            events.append(json.loads(line))
            if kill_when and kill_when(events[-1]):
                os.kill(proc.pid, signal.SIGKILL)  # a preempted node: no cleanup at all
                break
    rc = proc.wait()
    if rc not in (0, -signal.SIGKILL):
        raise AssertionError(proc.stderr.read())  # type: ignore[union-attr]
    return rc, events


@pytest.mark.slow
def test_sigkill_and_resume_give_bit_identical_weights(fusion_inputs, tmp_path):
    cfg = _cfg(max_steps=8, checkpoint_every=3, lam=0.9).model_dump(mode="json")
    common = {"pivot_dirs": [str(p) for p in fusion_inputs["pivot_dirs"]], "max_length": MAX_LEN,
              "aligned_dirs": [str(p) for p in fusion_inputs["aligned_dirs"]], "pivot": fusion_inputs["pivot"].path,
              "cfg": cfg}
    ref_store, run_store = f"file://{tmp_path / 'ref'}", f"file://{tmp_path / 'run'}"
    # the uninterrupted reference, in this process (the children below are what gets killed)
    train_target(TrainConfig(**cfg), pivot=ModelSpec(name="pivot", path=common["pivot"]),
                 data=FusionData(common["pivot_dirs"], common["aligned_dirs"], max_length=MAX_LEN),
                 store=ArtifactStore(ref_store), address="train/kill-t")

    run = {**common, "store": run_store}
    # 1. killed between checkpoints: after step 4 (checkpoint 3 is complete)
    rc, ev = _child(run, kill_when=lambda e: e["event"] == "step" and e["step"] == 4)
    assert rc == -signal.SIGKILL
    # 2. resumes from step 3; killed while writing checkpoint 6 (its files, no manifest)
    rc, ev = _child(run, env_extra={"FUSECHAT_KILL_AFTER_FILE": "optimizer.bin"})
    assert rc == -signal.SIGKILL and ev[0]["event"] == "resume" and ev[0]["step"] == 3
    assert ev[0]["checkpoint"] == "train/kill-t.checkpoints/checkpoint-0000003" and len(ev[0]["history"]) == 3
    store = ArtifactStore(run_store)
    assert [s for s, _ in complete_checkpoints(store, "train/kill-t")] == [3]
    assert (Path(store.root) / "train/kill-t.checkpoints/checkpoint-0000006").is_dir()  # the torn one is there, ignored
    # 3. resumes from step 3 again and finishes
    rc, ev = _child(run)
    assert rc == 0 and ev[0]["event"] == "resume" and ev[0]["step"] == 3
    assert [e["step"] for e in ev if e["event"] == "step"] == [4, 5, 6, 7, 8]

    ours = (Path(store.root) / "train/kill-t/model.safetensors").read_bytes()
    ref = (Path(ArtifactStore(ref_store).root) / "train/kill-t/model.safetensors").read_bytes()
    assert ours == ref
    assert _weights(Path(store.root) / "train/kill-t").keys() == _weights(Path(fusion_inputs["pivot"].path)).keys()


# -- from a run config: the Prefect task, accelerate launch, several processes --------------
@pytest.fixture(scope="module")
def run_setup(fusion_inputs, tmp_path_factory):
    """A run config whose pivot representation and source alignment sit at the plan's addresses."""
    from fusechat_core.config import load_config
    from fusechat_core.plan import RunPlan

    root = tmp_path_factory.mktemp("run")
    accel = root / "accelerate.yaml"
    accel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\n"
                     "mixed_precision: 'no'\nuse_cpu: true\n")
    config = {
        "name": "train-test", "store": f"file://{root / 'store'}", "seed": 3,
        "pivot": {"name": "pivot", "path": fusion_inputs["pivot"].path, "dtype": "float32"},
        "sources": [{"name": "src", "path": str(fusion_inputs["root"] / "source"), "dtype": "float32"}],
        "data": {"sources": [{"name": "m", "path": "demo:markov", "count": 4}]},
        "represent": {"top_k": TOP_K, "shards": SHARDS, "max_length": MAX_LEN},
        "train": {"learning_rate": 2e-3, "batch_size": 8, "micro_batch_size": 2, "max_steps": 4,
                  "checkpoint_every": 2, "mixed_precision": "no", "max_length": MAX_LEN, "clm_baseline": True},
    }
    path = root / "run.yaml"
    path.write_text(json.dumps(config))
    cfg = load_config(path)
    plan, store = RunPlan(cfg), ArtifactStore(cfg.store)
    rows = _rows()
    pivot_prefix, align_prefix = plan.represent(cfg.pivot), plan.align(cfg.sources[0])
    assert plan.represent_shard(cfg.pivot, 1) == f"{pivot_prefix}/shard-00001-of-{SHARDS:05d}"
    _write_shards(store, pivot_prefix, fusion_inputs["pivot_out"], rows, aligned=False)
    _write_shards(store, align_prefix, fusion_inputs["source_out"], rows, aligned=True)
    for stage in (pivot_prefix, align_prefix):
        with store.writer(stage, meta={"shards": SHARDS}):
            pass
    return {"config": config, "path": path, "cfg": cfg, "plan": plan, "store": store, "accel": accel,
            "root": root}


def test_prefect_task_trains_each_target_reports_and_caches(run_setup, prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from fusechat_core.plan import RunPlan
    from tasks._stage import result_storage_for
    from tasks.train import train_target as train_task

    cfg, plan = run_setup["cfg"], run_setup["plan"]
    # the source target runs under `accelerate launch` in a child, the CLM baseline in-process
    launched = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"accelerate_config": str(run_setup["accel"])})})
    storage = result_storage_for(cfg.store)
    clm_address, src_address = plan.train("clm"), RunPlan(launched).train("src")

    @flow
    def two_targets(config: dict, launched_config: dict) -> dict:
        t = train_task.with_options(result_storage=storage)
        clm = t(config=config, target="clm", address=clm_address, store=cfg.store, return_state=True)
        src = t(config=launched_config, target="src", address=src_address, store=cfg.store, return_state=True)
        return {"clm": (clm.name, clm.result()), "src": (src.name, src.result()), "run": str(flow_run.id)}

    import asyncio

    async def artifacts(runs: list[str]):
        async with get_client() as client:
            return await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=runs)))

    # the session's server (no server start of its own); what the runs made is read by their ids
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api}):
        first = two_targets(cfg.model_dump(mode="json"), launched.model_dump(mode="json"))
        again = two_targets(cfg.model_dump(mode="json"), launched.model_dump(mode="json"))
        made = asyncio.run(artifacts([first["run"], again["run"]]))
    assert first["clm"][0] == "Completed" and first["src"][0] == "Completed"
    assert again["clm"][0] == "Cached" and again["src"][0] == "Cached"
    store = run_setup["store"]
    for name, conf in (("clm", cfg), ("src", launched)):
        ref = first[name][1]
        assert ref["address"] == RunPlan(conf).train(name) and store.is_complete(ref["address"])
        log = json.loads((store.fetch(ref["address"]) / "fusechat_training.json").read_text())
        assert log["lam"] == (1.0 if name == "clm" else 0.9) and len(log["history"]) == 4
    keys = {a.key for a in made if a.key}
    from tasks._stage import artifact_key, dashboard_key

    src_key = dashboard_key(store.url, src_address, "metrics")
    assert {dashboard_key(store.url, clm_address, "metrics"), src_key} <= keys
    # the key names the target's address, and another store's run of it has a key of its own
    assert src_key.startswith(artifact_key(src_address) + "-metrics-")
    assert dashboard_key("s3://elsewhere/x", src_address, "metrics") != src_key
    # one version per checkpoint (2 rows at step 2; none at the last step) and at the end: every step
    table = max((a for a in made if a.key == src_key), key=lambda a: a.created)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["fusion_loss"] is not None for r in rows)
    progress = [a for a in made if a.type == "progress"]
    assert len(progress) >= 2 and all(float(a.data) == 100.0 for a in progress)


@pytest.mark.slow
def test_two_processes_train_the_same_target_as_one(run_setup, tmp_path):
    """DDP on two CPU processes (gloo): the per-step token normalisation and the rank split are right."""
    from fusechat_core.train import train_from_config

    single = run_setup["cfg"].model_copy(update={"store": f"file://{tmp_path / 'one'}"})
    one = ArtifactStore(single.store)
    # inputs into the fresh stores: copy the representation and alignment artifacts
    import shutil

    src_root = Path(run_setup["store"].root)
    for name in ("one", "two"):
        for stage in ("represent", "align"):
            shutil.copytree(src_root / stage, tmp_path / name / stage)
    train_from_config(single, "src")
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "fusechat_core.train", str(run_setup["path"]), "--target", "src",
                           "--store", f"file://{tmp_path / 'two'}"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert any(e["event"] == "start" and e["processes"] == 2 for e in events)
    address = run_setup["plan"].train("src")
    w1 = _weights(one.fetch(address))
    w2 = _weights(ArtifactStore(f"file://{tmp_path / 'two'}").fetch(address))
    pivot = _weights(Path(run_setup["config"]["pivot"]["path"]))
    for name in w1:
        # summation order differs between one and two processes; the update itself must not
        delta = (w1[name] - pivot[name]).abs().max()
        assert torch.allclose(w1[name], w2[name], atol=1e-4 * max(float(delta), 1e-3)), name


_MEET = """
import os
import torch.distributed as dist
os.environ.setdefault("RANK", "0")  # accelerate's simple launcher starts rank 0 of its group
os.environ.setdefault("WORLD_SIZE", "1")
dist.init_process_group("gloo")  # rank 0 serves the group's store at MASTER_ADDR:MASTER_PORT
print("met on port", os.environ["MASTER_PORT"], flush=True)
dist.destroy_process_group()
"""


def test_a_launch_meets_on_a_free_port_when_another_job_holds_accelerates_default(tmp_path):
    """Two runs on one node (or another team's job) each launch training: accelerate's fixed
    port 29500 is then taken, and rank 0 could not serve its group's store there (or the
    ranks met the other job's). The launch command gives its group a free port of its own:
    shown with 29500 held and rank 0 of a two-process CPU launch setting up its group."""
    import socket

    from tasks.train import launch_command

    accel = tmp_path / "accelerate.yaml"
    accel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n"
                     "num_machines: 1\nmixed_precision: 'no'\nuse_cpu: true\n")
    script = tmp_path / "meet.py"
    script.write_text(_MEET)
    cmd = launch_command(accel, tmp_path / "run.json", "src")
    assert cmd[-4:] == ["fusechat_core.train", str(tmp_path / "run.json"), "--target", "src"]
    launch = cmd[:cmd.index("-m", 3)] + [str(script)]  # the same launch, a few lines instead of training
    with socket.socket() as held:
        try:
            held.bind(("", 29500))
            held.listen()
        except OSError:
            pass  # already held by something else on this machine: all the better
        out = subprocess.run(launch, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    [line] = [x for x in out.stdout.splitlines() if x.startswith("met on port")]
    assert line != "met on port 29500"
    # a config that names its port (or spans machines, where every node must agree) keeps it
    accel.write_text(accel.read_text() + "main_process_port: 29612\n")
    assert "--main_process_port" not in launch_command(accel, tmp_path / "run.json", "src")
    accel.write_text(accel.read_text().replace("num_machines: 1", "num_machines: 2").replace(
        "main_process_port: 29612\n", ""))
    assert "--main_process_port" not in launch_command(accel, tmp_path / "run.json", "src")


_SLOW_CHECKPOINT_UPLOAD = """
import os, sys, time
from fusechat_core import store
real = store.ArtifactStore.put_dir
def slow(self, address, local, **kw):
    if ".checkpoints/" in address:
        time.sleep(float(os.environ["UPLOAD_S"]))  # ~84 GB to S3 from one process, at 7B
    return real(self, address, local, **kw)
store.ArtifactStore.put_dir = slow
from fusechat_core.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_ranks_wait_for_a_slow_checkpoint_upload_as_long_as_the_config_says(run_setup, tmp_path):
    """The main process uploads each checkpoint while the other ranks wait at a barrier: a
    7B checkpoint takes longer than NCCL's default 10 minutes to reach S3, and every rank
    died at the first checkpoint. The wait is ``train.collective_timeout_s``: an upload of
    4 s under a 1.5 s limit fails the group (the setting reaches it), under 60 s it trains."""
    import shutil

    import yaml

    script = tmp_path / "slow_upload.py"
    script.write_text(_SLOW_CHECKPOINT_UPLOAD)
    src_root = Path(run_setup["store"].root)
    outcomes = {}
    for limit in (1.5, 60.0):
        root = tmp_path / f"limit-{limit}"
        for stage in ("represent", "align"):
            shutil.copytree(src_root / stage, root / stage)
        config = {**run_setup["config"], "store": f"file://{root}",
                  "train": {**run_setup["config"]["train"], "collective_timeout_s": limit}}
        path = tmp_path / f"limit-{limit}.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1", "UPLOAD_S": "4"}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               str(script), str(path), "--target", "src"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        outcomes[limit] = (proc.returncode, proc.stderr)
        done = ArtifactStore(f"file://{root}").is_complete(run_setup["plan"].train("src"))
        assert done == (proc.returncode == 0), proc.stderr[-2000:]
    assert outcomes[1.5][0] != 0 and "timed out" in outcomes[1.5][1].lower(), outcomes[1.5][1][-2000:]
    assert outcomes[60.0][0] == 0, outcomes[60.0][1][-3000:]


def test_a_resume_from_s3_leaves_no_copy_of_its_checkpoint_on_the_node(fusion_inputs, tmp_path, s3_env, monkeypatch):
    """A resume copies its checkpoint from S3 into the node's fetch cache (~84 GB at 7B) and
    reads it once: the copy is removed after loading, or each in-pod retry left another
    one. The resumed run ends as the uninterrupted one, bit for bit."""
    import uuid

    cache = tmp_path / "cache"
    monkeypatch.setenv("FUSECHAT_CACHE", str(cache))
    cfg = _cfg(max_steps=6, checkpoint_every=2, lam=0.9)
    pivot = ModelSpec(name="pivot", path=fusion_inputs["pivot"].path)

    def data() -> FusionData:
        return FusionData(fusion_inputs["pivot_dirs"], fusion_inputs["aligned_dirs"], max_length=MAX_LEN)

    class Preempted(Exception):
        pass

    def preempt(event: dict) -> None:
        if event["event"] == "step" and event["step"] == 3:
            raise Preempted

    store = ArtifactStore(f"s3://fusechat-test/{uuid.uuid4().hex}")
    with pytest.raises(Preempted):
        train_target(cfg, pivot=pivot, data=data(), store=store, address="train/s3", on_event=preempt)
    [(step, ck)] = complete_checkpoints(store, "train/s3")
    assert step == 2
    expected = store.fetched_path(ck)  # the node's cache, by the checkpoint's digest
    fetched: list[tuple[str, Path, bool]] = []  # (address, folder, its files there when handed out)
    real_fetch = ArtifactStore.fetch

    def recording(self, address, dest=None):
        folder = real_fetch(self, address, dest)
        fetched.append((address, folder, (folder / "trainer_state.json").is_file()))
        return folder

    monkeypatch.setattr(ArtifactStore, "fetch", recording)
    events: list[dict] = []
    train_target(cfg, pivot=pivot, data=data(), store=store, address="train/s3", on_event=events.append)
    assert events[0] == {**events[0], "event": "resume", "step": 2}
    [(address, copy, whole)] = [f for f in fetched if f[0] == ck]  # fetched once, into the cache, whole
    assert whole and copy == expected and copy.parent == cache
    assert not copy.exists()  # read, then removed
    ref = ArtifactStore(f"file://{tmp_path / 'ref'}")
    train_target(cfg, pivot=pivot, data=data(), store=ref, address="train/s3")
    ours = store.read_bytes("train/s3", "model.safetensors")
    assert ours == (Path(ref.root) / "train/s3/model.safetensors").read_bytes()
