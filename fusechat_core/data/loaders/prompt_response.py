from fusechat_core.data.conversation import LOADERS, field


@LOADERS.register("prompt_response")
def load_prompt_response(row: dict) -> list[tuple[str, str]]:
    """One exchange under common column names (MetaMathQA, Magicoder, plain pairs)."""
    prompt = field(row, "prompt", "query", "problem", "question", "instruction")
    response = field(row, "response", "completion", "solution", "answer", "output")
    return [("human", prompt), ("gpt", response)]
