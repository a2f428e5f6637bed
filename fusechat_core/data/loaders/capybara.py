from fusechat_core.data.conversation import LOADERS, MalformedRow, field


@LOADERS.register("capybara")
def load_capybara(row: dict) -> list[tuple[str, str]]:
    """LDJnr/Capybara: ``{"source": ..., "conversation": [{"input": ..., "output": ...}, ...]}``."""
    pairs = field(row, "conversation")
    if not isinstance(pairs, list):
        raise MalformedRow("conversation_not_a_list")
    turns: list[tuple[str, str]] = []
    try:
        for pair in pairs:
            turns += [("human", pair["input"]), ("gpt", pair["output"])]
    except (KeyError, TypeError):
        raise MalformedRow("bad_turn") from None
    return turns
