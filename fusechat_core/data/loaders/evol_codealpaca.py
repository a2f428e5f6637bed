from fusechat_core.data.conversation import LOADERS, field, text


@LOADERS.register("evol_codealpaca")
def load_evol_codealpaca(row: dict) -> list[tuple[str, str]]:
    """theblackcat102/evol-codealpaca-v1: ``{"instruction", "output"}`` (no ``input`` column);
    one exchange."""
    return [("human", text(field(row, "instruction"))), ("gpt", text(field(row, "output")))]
