from fusechat_core.data.conversation import LOADERS
from fusechat_core.data.loaders.chatml import load_chatml


@LOADERS.register("oasst_top1")
def load_oasst_top1(row: dict) -> list[tuple[str, str]]:
    """OpenAssistant/oasst_top1_2023-08-25: the top-ranked Oasst1 threads flattened to one
    ChatML string, ``{"text": "<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>\\n"}``."""
    return load_chatml(row)
