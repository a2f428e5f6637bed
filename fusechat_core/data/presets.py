"""The paper's FuseChat-Mixture (SPEC §1.1) as a preset of data sources."""

from __future__ import annotations

FUSECHAT_MIXTURE: list[dict] = [
    {"name": "orca-best", "path": "shahules786/orca-best", "format": "auto", "count": 20000},
    {"name": "capybara", "path": "LDJnr/Capybara", "format": "capybara", "count": 16000},
    {"name": "no_robots", "path": "HuggingFaceH4/no_robots", "format": "openai", "count": 9500},
    {"name": "sharegpt_gpt4", "path": "shibing624/sharegpt_gpt4", "format": "sharegpt", "count": 6200},
    {"name": "oasst_top1", "path": "OpenAssistant/oasst_top1_2023-08-25", "format": "chatml", "count": 5000},
    {"name": "metamathqa", "path": "meta-math/MetaMathQA", "format": "prompt_response", "count": 10000},
    {"name": "magicoder_oss", "path": "ise-uiuc/Magicoder-OSS-Instruct-75K", "format": "prompt_response",
     "count": 10000},
    {"name": "evol_codealpaca", "path": "theblackcat102/evol-codealpaca-v1", "format": "alpaca", "count": 10000},
    {"name": "python_code_23k", "path": "ajibawa-2023/Python-Code-23k-ShareGPT", "format": "sharegpt", "count": 10000},
]

PRESETS = {"fusechat-mixture": FUSECHAT_MIXTURE}
