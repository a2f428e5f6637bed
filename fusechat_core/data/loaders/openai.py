from fusechat_core.data.conversation import LOADERS, MalformedRow, field


@LOADERS.register("openai")
def load_openai_messages(row: dict) -> list[tuple[str, str]]:
    """``{"messages": [{"role": "user", "content": ...}, ...]}`` (OpenAI chat shape)."""
    messages = field(row, "messages")
    if not isinstance(messages, list):
        raise MalformedRow("messages_not_a_list")
    try:
        return [(m["role"], m["content"]) for m in messages]
    except (KeyError, TypeError):
        raise MalformedRow("bad_turn") from None
