from fusechat_core.data.conversation import LOADERS, field, text


@LOADERS.register("alpaca")
def load_alpaca(row: dict) -> list[tuple[str, str]]:
    """``{"instruction", "input", "output"}``: the input, when present, follows the instruction."""
    instruction = text(field(row, "instruction"))
    extra = row.get("input") or ""
    prompt = f"{instruction.strip()}\n\n{text(extra).strip()}" if str(extra).strip() else instruction
    return [("human", prompt), ("gpt", field(row, "output"))]
