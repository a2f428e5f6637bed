from fusechat_core.data.conversation import LOADERS, field, text


@LOADERS.register("metamathqa")
def load_metamathqa(row: dict) -> list[tuple[str, str]]:
    """meta-math/MetaMathQA: ``{"type", "query", "original_question", "response"}``; one
    exchange, the (augmented) ``query`` and its ``response``. ``original_question`` is the
    GSM8K/MATH question it was made from, not part of the conversation."""
    return [("human", text(field(row, "query"))), ("gpt", text(field(row, "response")))]
