"""Tiny real models of the paper's three architectures, for tests and the demo.

``build_tiny_model`` writes a complete Hugging Face folder (config, safetensors
weights, tokenizer with a chat template) that every stage loads exactly as it
would load OpenChat-3.5 or Mixtral from the hub.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Literal

from fusechat_core.models import load_tokenizer, tokenizer_files, write_files

Arch = Literal["mistral", "mixtral", "llama"]
_INIT_LOCK = threading.Lock()


def tiny_config(arch: Arch, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 128, max_positions: int = 1024,
                bos_token_id: int | None = 1, eos_token_id: int | None = 2) -> Any:
    from transformers import LlamaConfig, MistralConfig, MixtralConfig

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                  intermediate_size=intermediate, max_position_embeddings=max_positions,
                  bos_token_id=bos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=False)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"unknown architecture {arch!r}")


def build_tiny_model(arch: Arch, tokenizer: str, out_dir: str | Path, *, seed: int = 0,
                     chat_template: str | None = None, dtype: str = "float32", device: str = "cpu",
                     **shape: Any) -> Path:
    """A randomly initialised tiny causal LM with a real tokenizer, saved to ``out_dir``.

    The saved tokenizer carries the template ``ChatFormatter`` picks for this tokenizer
    and ``chat_template`` (the named one, else the tokenizer's own, else mistral's), so
    the folder renders conversations exactly as a ModelSpec naming the tokenizer does.

    ``dtype`` and ``device``: what the weights are made in and saved as; a 7B-shaped random
    model (the GPU benchmark's) is initialised on the GPU in bfloat16 in seconds, where
    float32 on the CPU would take minutes and twice the disk.
    """
    import torch

    from fusechat_core.models import warm_imports

    warm_imports()
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tokenizer)
    cfg = tiny_config(arch, len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape)
    # torch's default generator is process-global: two models initialised at once in
    # a flow's worker threads would interleave their draws and neither would be
    # reproducible. One initialisation at a time.
    with _INIT_LOCK:
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    write_files(tokenizer_files(tokenizer, template=chat_template), out)
    return out
