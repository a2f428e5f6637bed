import re

from fusechat_core.data.conversation import LOADERS, MalformedRow, field, text

_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S)


@LOADERS.register("chatml")
def load_chatml(row: dict) -> list[tuple[str, str]]:
    """A ChatML string, as in the flattened Oasst trees (OpenAssistant/oasst_top1_*)."""
    turns = _TURN.findall(text(field(row, "text")))
    if not turns:
        raise MalformedRow("no_chatml_turns")
    return [(role, value) for role, value in turns]
