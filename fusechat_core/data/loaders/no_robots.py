from fusechat_core.data.conversation import LOADERS
from fusechat_core.data.loaders.openai import load_openai_messages


@LOADERS.register("no_robots")
def load_no_robots(row: dict) -> list[tuple[str, str]]:
    """HuggingFaceH4/no_robots: ``{"prompt", "prompt_id", "messages": [{"role", "content"}], "category"}``.

    ``messages`` is the whole conversation (``prompt`` repeats its first user turn);
    roles are ``system`` (some rows), ``user`` and ``assistant``.
    """
    return load_openai_messages(row)
