from fusechat_core.data.conversation import LOADERS, field, text


@LOADERS.register("magicoder_oss")
def load_magicoder_oss(row: dict) -> list[tuple[str, str]]:
    """ise-uiuc/Magicoder-OSS-Instruct-75K: ``{"lang", "raw_index", "index", "seed",
    "openai_fingerprint", "problem", "solution"}``; one exchange, ``problem`` → ``solution``.
    ``seed`` is the open-source snippet the problem was written from, not a turn."""
    return [("human", text(field(row, "problem"))), ("gpt", text(field(row, "solution")))]
