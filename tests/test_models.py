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
    kept = weakref.ref(_cached_model(spec, "cpu"))
    assert kept() is not None  # the slot holds it between shards
    release_model(spec)
    assert kept() is None
    assert gc_collections == []
