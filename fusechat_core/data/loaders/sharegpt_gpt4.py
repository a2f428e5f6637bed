from fusechat_core.data.conversation import LOADERS
from fusechat_core.data.loaders.sharegpt import load_sharegpt


@LOADERS.register("sharegpt_gpt4")
def load_sharegpt_gpt4(row: dict) -> list[tuple[str, str]]:
    """shibing624/sharegpt_gpt4 (``sharegpt_gpt4.jsonl``, the GPT-4 conversations):
    ``{"conversations": [{"from": "human" | "gpt", "value": ...}, ...]}``, multi-turn and
    multilingual (``clean: vicuna`` keeps the English ones, as the paper did)."""
    return load_sharegpt(row)
