"""Loading and releasing models: a dropped model's memory comes back without paying for a
full garbage collection unless something still holds it."""

from __future__ import annotations

import gc
import weakref

from fusechat_core import models


def _tiny(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["pivot"], dtype=torch.float32)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()  # gradients and autograd state too
    return model


def test_a_dropped_model_is_freed_by_its_refcount_without_a_collection(tiny_models, gc_collections):
    model = _tiny(tiny_models)
    dropped = weakref.ref(model)
    del model
    models.release_memory(dropped)
    assert dropped() is None
    assert gc_collections == []


def test_a_model_kept_alive_by_a_cycle_is_collected(tiny_models, gc_collections):
    model = _tiny(tiny_models)
    dropped = weakref.ref(model)
    cycle: list = [model]
    cycle.append(cycle)
    gc.disable()  # no automatic collection between the drop and the release
    try:
        del model, cycle
        assert dropped() is not None  # only a collection can free it now
        models.release_memory(dropped)
    finally:
        gc.enable()
    assert dropped() is None
    assert gc_collections == [1]


def test_the_represent_stage_lets_go_of_its_kept_model_without_a_collection(tiny_models, gc_collections):
    from fusechat_core.config import ModelSpec
    from fusechat_core.represent import _cached_model, release_model

    spec = ModelSpec(name="pivot", path=str(tiny_models["pivot"]))
    # the slot is per process: an earlier file's in-process represent run of this very spec
    # (test_represent's, test_align_stage's) leaves its model there, and the load below would
    # hand back that model, with whatever references of its own it still has
    release_model()
    gc_collections.clear()
    kept = weakref.ref(_cached_model(spec, "cpu"))
    assert kept() is not None  # the slot holds it between shards
    release_model(spec)
    assert kept() is None, _holders(kept())
    assert gc_collections == []


def test_a_model_spread_over_every_gpu_is_never_kept_beside_single_gpu_ones(monkeypatch):
    """The represent stage keeps one model per device. ``cuda`` (a model spread over every GPU
    with device_map, or a one-GPU process's) overlaps every ``cuda:k``: the pivot and SOLAR
    kept on cuda:0 and cuda:1 stayed beside Mixtral's 94 GB. The loader is replaced by a
    stand-in: this machine has no GPU to load onto, and what is tested is which are kept."""
    from fusechat_core import represent
    from fusechat_core.config import ModelSpec

    class Loaded:
        def __init__(self, spec, device):
            self.name, self.device = spec.name, device

    monkeypatch.setattr(represent, "load_causal_lm", Loaded)
    monkeypatch.setattr(represent, "_MODEL_SLOT", {})
    pivot, solar, mixtral = (ModelSpec(name=n, path=f"org/{n}") for n in ("pivot", "solar", "mixtral"))

    def kept() -> dict[str, str]:
        return {d: m.name for d, (_, m) in represent._MODEL_SLOT.items()}

    represent._cached_model(pivot, "cuda:0")
    represent._cached_model(solar, "cuda:1")
    represent._cached_model(pivot, "cuda:0")  # kept: loaded once
    assert kept() == {"cuda:0": "pivot", "cuda:1": "solar"}
    represent._cached_model(mixtral, "cuda")
    assert kept() == {"cuda": "mixtral"}
    represent._cached_model(solar, "cuda:1")
    assert kept() == {"cuda:1": "solar"}
    represent._cached_model(pivot, "cpu")  # the CPU shares nothing with the GPUs
    assert kept() == {"cuda:1": "solar", "cpu": "pivot"}


def test_models_load_onto_several_gpus_side_by_side(monkeypatch):
    """One lock held through every load made an 8-GPU node load its eight 7B models one after
    another (a minute or two each), and every shard waited on Mixtral's. GPUs' loads now run
    side by side (each GPU is one task's, models.claim_gpu); the CPU's take turns. The loader
    is a stand-in that takes 0.6 s, on a machine with no GPU."""
    import threading
    import time

    from fusechat_core import represent
    from fusechat_core.config import ModelSpec

    class Loaded:  # weakly referable, as a model is
        def __init__(self, spec, device):
            time.sleep(0.6)
            self.name = spec.name

    slow = Loaded

    monkeypatch.setattr(represent, "load_causal_lm", slow)
    monkeypatch.setattr(represent, "_MODEL_SLOT", {})

    def load_at_once(devices: list[str]) -> float:
        start = time.monotonic()
        threads = [threading.Thread(target=represent._cached_model, args=(ModelSpec(name=f"m{i}", path=f"org/m{i}"), d))
                   for i, d in enumerate(devices)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - start

    assert load_at_once(["cuda:0", "cuda:1", "cuda:2", "cuda:3"]) < 1.5  # side by side, not 2.4 s
    assert {d: m.name for d, (_, m) in represent._MODEL_SLOT.items()} == {f"cuda:{i}": f"m{i}" for i in range(4)}
    monkeypatch.setattr(represent, "_MODEL_SLOT", {})
    assert load_at_once(["cpu", "cpu"]) >= 1.2  # the CPU's loads take turns


def _holders(obj: object) -> str:
    """What still refers to ``obj``, for the failure message: once, in a full suite on two
    workers, the model survived a collection. It was an earlier file's (the slot held the
    same spec's model: seen in a one-process rerun of that worker's files); whatever held it
    did not hold it again there, so the message names it if it ever comes back."""
    return "referred to by: " + "; ".join(f"{type(r).__name__} {repr(r)[:160]}" for r in gc.get_referrers(obj))


def test_folders_with_the_same_tokenizer_files_share_one_load_and_a_changed_folder_reloads(
        tiny_models, tmp_path, monkeypatch):
    import shutil

    from transformers import AutoTokenizer

    # this process's earlier tests have loaded these tokenizers already: start from an empty cache
    monkeypatch.setattr(models, "_TOKENIZERS", {})
    monkeypatch.setattr(models, "_FOLDER_KEYS", {})

    loads = []
    real = AutoTokenizer.from_pretrained.__func__

    def counted(cls, path, *args, **kwargs):
        loads.append(str(path))
        return real(cls, path, *args, **kwargs)

    copies = []
    for name in ("a", "b"):
        copies.append(tmp_path / name)
        shutil.copytree(tiny_models["pivot"], copies[-1])
    other = tmp_path / "other"
    shutil.copytree(tiny_models["mixtral"], other)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(counted))
    first = models.load_tokenizer(str(copies[0]))
    assert models.load_tokenizer(str(copies[1])) is first
    assert loads == [str(copies[0])]
    assert len(models.load_tokenizer(str(other))) == 32768 and len(loads) == 2
    # a folder whose tokenizer files change is loaded again, not served from the cache
    (copies[1] / "tokenizer_config.json").write_text((other / "tokenizer_config.json").read_text())
    for f in ("tokenizer.json", "tokenizer.model"):
        if (other / f).exists():
            shutil.copy(other / f, copies[1] / f)
    assert len(models.load_tokenizer(str(copies[1]))) == 32768 and len(loads) == 3


def test_tokenizer_files_are_what_transformers_saves_and_repeat_without_a_reload(tmp_path):
    """The bytes a model folder gets are those of a freshly loaded tokenizer carrying the
    chat template, saved by transformers itself; a second folder gets the same bytes."""
    from transformers import AutoTokenizer

    from fusechat_core.chat import ChatFormatter

    template = "chatml"  # not the tokenizer's own
    files = models.tokenizer_files("builtin:mistral-v3", template=template)
    tok = AutoTokenizer.from_pretrained(models.resolve_ref("builtin:mistral-v3"))
    tok.chat_template = ChatFormatter(tok, template).template
    tok.init_kwargs.pop("local_files_only", None)
    tok.save_pretrained(tmp_path / "direct")
    direct = {p.name: p.read_bytes() for p in (tmp_path / "direct").iterdir()}
    assert files == direct and "tokenizer.json" in files
    assert b"local_files_only" not in files["tokenizer_config.json"]
    assert models.tokenizer_files("builtin:mistral-v3", template=template) is files  # made once
    models.write_files(files, tmp_path / "model")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert loaded.chat_template == tok.chat_template != AutoTokenizer.from_pretrained(
        models.resolve_ref("builtin:mistral-v3")).chat_template
    assert len(loaded) == 32768


def test_model_holding_tasks_of_one_process_spread_over_its_gpus():
    """Eight represent shards on an 8-GPU node under eight threads: each gets a GPU of its
    own (all of them loaded onto cuda:0 before, and ran out of its memory); a ninth waits for
    one to be freed and gets that one (it shared one before: two 7B models on one GPU, and a
    pod with one GPU and four threads loaded four); anything but plain ``cuda`` is kept."""
    import contextlib
    import threading

    from fusechat_core.models import claim_gpu

    def claim_in_a_thread(count: int) -> tuple[threading.Thread, list[str], threading.Event]:
        got, release = [], threading.Event()

        def hold() -> None:
            with claim_gpu("cuda", count=count) as device:
                got.append(device)
                release.wait(10)
        t = threading.Thread(target=hold)
        t.start()
        return t, got, release

    stacks = [contextlib.ExitStack() for _ in range(8)]
    got = [st.enter_context(claim_gpu("cuda", count=8)) for st in stacks]
    assert got == [f"cuda:{i}" for i in range(8)]
    ninth, ninth_got, ninth_done = claim_in_a_thread(8)
    ninth.join(0.5)
    assert ninth.is_alive() and ninth_got == []  # every GPU held: it waits
    stacks[5].close()  # the task on cuda:5 ends
    for _ in range(200):
        if ninth_got:
            break
        ninth.join(0.05)
    assert ninth_got == ["cuda:5"]
    ninth_done.set()
    ninth.join(10)
    for st in stacks:
        st.close()
    # one GPU, two threads: one model at a time, the second given "cuda" once the first is done
    first, first_got, first_done = claim_in_a_thread(1)
    second, second_got, second_done = claim_in_a_thread(1)
    second.join(0.5)
    assert first_got == ["cuda"] and second_got == []
    first_done.set()
    first.join(10)
    second_done.set()
    second.join(10)
    assert second_got == ["cuda"]
    with claim_gpu("cuda", count=8) as a, claim_gpu("cuda", count=8) as b:
        assert (a, b) == ("cuda:0", "cuda:1")  # every claim above was given back
    for kept in ("cpu", "cuda:3", "mps"):
        with claim_gpu(kept, count=8) as device:
            assert device == kept
    # a model spread over every GPU (device_map) claims them all, as "cuda" (one per claimed
    # index was 8 copies of Mixtral's 94 GB): another model waits until it is done, and it
    # waits until every GPU is free (it ran beside single-GPU models before)
    with claim_gpu("cuda", count=8, spread=True) as a:
        assert a == "cuda"
        single, single_got, single_done = claim_in_a_thread(8)
        single.join(0.5)
        assert single.is_alive() and single_got == []
    for _ in range(200):
        if single_got:
            break
        single.join(0.05)
    assert single_got == ["cuda:0"]

    def spread_in_a_thread() -> tuple[threading.Thread, list[str]]:
        got: list[str] = []

        def hold() -> None:
            with claim_gpu("cuda", count=8, spread=True) as device:
                got.append(device)
        t = threading.Thread(target=hold)
        t.start()
        return t, got

    mixtral, mixtral_got = spread_in_a_thread()
    mixtral.join(0.5)
    assert mixtral.is_alive() and mixtral_got == []  # cuda:0 is still held
    single_done.set()
    mixtral.join(10)
    assert mixtral_got == ["cuda"]
    # from threads at once, as the task runner's workers claim them
    seen, barrier = [], threading.Barrier(4)

    def task():
        with claim_gpu("cuda", count=4) as device:
            seen.append(device)
            barrier.wait(timeout=10)  # all four hold theirs at the same time

    workers = [threading.Thread(target=task) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(seen) == [f"cuda:{i}" for i in range(4)]
