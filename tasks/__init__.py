"""One Prefect task per stage: thin wrappers over ``fusechat_core``."""
