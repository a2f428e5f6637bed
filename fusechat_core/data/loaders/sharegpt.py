from fusechat_core.data.conversation import LOADERS, MalformedRow, field


@LOADERS.register("sharegpt")
def load_sharegpt(row: dict) -> list[tuple[str, str]]:
    """``{"conversations": [{"from": "human", "value": ...}, ...]}``."""
    turns = field(row, "conversations", "items")
    if not isinstance(turns, list):
        raise MalformedRow("conversations_not_a_list")
    try:
        return [(t["from"], t["value"]) for t in turns]
    except (KeyError, TypeError):
        raise MalformedRow("bad_turn") from None
