from fusechat_core.data.conversation import LOADERS
from fusechat_core.data.loaders.sharegpt import load_sharegpt


@LOADERS.register("python_code_23k")
def load_python_code_23k(row: dict) -> list[tuple[str, str]]:
    """ajibawa-2023/Python-Code-23k-ShareGPT: ``{"id", "conversations": [{"from": "human",
    "value"}, {"from": "gpt", "value"}]}``, one exchange per row."""
    return load_sharegpt(row)
