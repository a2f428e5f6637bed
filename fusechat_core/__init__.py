"""FuseChat: knowledge fusion of chat LLMs. The library: no Prefect in here."""

__version__ = "0.1.0"
