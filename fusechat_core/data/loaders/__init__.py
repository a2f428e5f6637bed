"""Data-source loaders, one small file each; importing this package registers them."""

from fusechat_core.data.loaders import alpaca, capybara, chatml, openai, prompt_response, sharegpt  # noqa: F401
