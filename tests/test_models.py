"""Loading and releasing models: a dropped model's memory comes back without paying for a
full garbage collection unless something still holds it."""

from __future__ import annotations

import gc
import weakref

import pytest

from fusechat_core import models


@pytest.fixture
def collections(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = gc.collect

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(models.gc, "collect", counted)
    return calls


def _tiny(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["pivot"], dtype=torch.float32)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()  # gradients and autograd state too
    return model


def test_a_dropped_model_is_freed_by_its_refcount_without_a_collection(tiny_models, collections):
    model = _tiny(tiny_models)
    dropped = weakref.ref(model)
    del model
    models.release_memory(dropped)
    assert dropped() is None
    assert collections == []


def test_a_model_kept_alive_by_a_cycle_is_collected(tiny_models, collections):
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
    assert collections == [1]
