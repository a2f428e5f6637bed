"""The paper's FuseChat-Mixture (SPEC §1.1) as presets of data sources.

``fusechat-mixture`` rebuilds the mixture from its nine hub sources, each read by
the loader written for its published schema (``data/loaders/``). Revisions are
pinned where a commit from before the paper (February 2024) is known; where it is
not, the comment says so, and the run reads the repository's current head (the
dataset address then names no commit, so a changed upstream set is not noticed).

``fusechat-mixture-released`` reads the mixture FuseAI published with the paper
(already cleaned and split into blocks of at most 2048 tokens), so a reproduction
need not rebuild it from sources that may have moved since.
"""

from __future__ import annotations

from fusechat_core.config import DataConfig, DataSourceSpec

FUSECHAT_MIXTURE: list[dict] = [
    # Last commit of the repository (25 Aug 2023, "Update README.md"): before the paper.
    {"name": "orca-best", "path": "shahules786/orca-best", "format": "orca_best", "count": 20000,
     "revision": "58d7d9e8a6ceaaa4ed40c5d1884af4c5f4c0a743"},
    # Revision not pinned: no commit from the paper's time frame is known here.
    {"name": "capybara", "path": "LDJnr/Capybara", "format": "capybara", "count": 16000},
    # Revision not pinned (unknown). The paper's 9,500 are the train split; older
    # revisions named it "train_sft": a pinned older revision needs split: train_sft.
    {"name": "no_robots", "path": "HuggingFaceH4/no_robots", "format": "no_robots", "count": 9500},
    # The repository holds several JSONL files; the paper's 6.2k conversations are the
    # GPT-4 ones in sharegpt_gpt4.jsonl. Revision not pinned (unknown).
    {"name": "sharegpt_gpt4", "path": "shibing624/sharegpt_gpt4", "format": "sharegpt_gpt4", "count": 6200,
     "data_files": "sharegpt_gpt4.jsonl"},
    # Revision not pinned (unknown).
    {"name": "oasst_top1", "path": "OpenAssistant/oasst_top1_2023-08-25", "format": "oasst_top1", "count": 5000},
    # Revision not pinned (unknown).
    {"name": "metamathqa", "path": "meta-math/MetaMathQA", "format": "metamathqa", "count": 10000},
    # Revision not pinned (unknown).
    {"name": "magicoder_oss", "path": "ise-uiuc/Magicoder-OSS-Instruct-75K", "format": "magicoder_oss",
     "count": 10000},
    # Revision not pinned (unknown).
    {"name": "evol_codealpaca", "path": "theblackcat102/evol-codealpaca-v1", "format": "evol_codealpaca",
     "count": 10000},
    # Revision not pinned (unknown).
    {"name": "python_code_23k", "path": "ajibawa-2023/Python-Code-23k-ShareGPT", "format": "python_code_23k",
     "count": 10000},
]

FUSECHAT_MIXTURE_RELEASED: list[dict] = [
    # One JSON file of ShareGPT-shaped conversations ({"id", "conversations": [{"from", "value"}]}).
    # Revision not pinned: the hub page shows head 99584fb (a README edit), but its full
    # hash is not known here; data_files pins the one data file.
    {"name": "fusechat-mixture", "path": "FuseAI/FuseChat-Mixture", "format": "sharegpt",
     "data_files": "fusechat_v1_clean_split_2048_filter_wrong.json"},
]

PRESETS = {"fusechat-mixture": FUSECHAT_MIXTURE, "fusechat-mixture-released": FUSECHAT_MIXTURE_RELEASED}


def sources_of(cfg: DataConfig) -> list[DataSourceSpec]:
    """The run's data sources: the preset's, then the config's own."""
    specs = [DataSourceSpec.model_validate(s, context={"hub_ids": True}) for s in PRESETS[cfg.preset]] \
        if cfg.preset else []
    return specs + list(cfg.sources)
