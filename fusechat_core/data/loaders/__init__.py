"""Data-source loaders, one small file each; importing this package registers them.

Generic shapes (sharegpt, openai, chatml, alpaca, prompt_response, capybara) and one
loader per preset source's published schema, named like the preset's source.
"""

from fusechat_core.data.loaders import (  # noqa: F401
    alpaca,
    capybara,
    chatml,
    evol_codealpaca,
    magicoder_oss,
    metamathqa,
    no_robots,
    oasst_top1,
    openai,
    orca_best,
    prompt_response,
    python_code_23k,
    sharegpt,
    sharegpt_gpt4,
)
