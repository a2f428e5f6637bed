"""``fusechat-mergekit-yaml``: mergekit's own ``mergekit-yaml``, with VaRM among its methods.

VaRM is registered in mergekit's method registry (``varm.py``), so any mergekit
YAML may say ``merge_method: varm`` and mergekit's machinery (its planner,
out-of-core loader, writer and every ``mergekit-yaml`` option) runs it, exactly
as it runs its own methods, with the compute pinned as in every fusechat merge
(``determinism.pin_compute``), so the bytes are ``fusechat merge``'s::

    fusechat-mergekit-yaml varm.yml ./merged [any mergekit-yaml option]

A merged folder of a run names its inputs by store address (the artifact's bytes
must not depend on where the store is). ``--store URL`` replays it: each model
reference that is an artifact of that store becomes the absolute local folder
holding it (the store's own folder on ``file://``, a fetched copy from S3), and
the ``mergekit_config.yml`` written beside the output names those folders.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

PROG = "fusechat-mergekit-yaml"


def _pop_store(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a == "--store" and i + 1 < len(args):
            url = args[i + 1]
            del args[i:i + 2]
            return url
        if a.startswith("--store="):
            del args[i]
            return a.partition("=")[2]
    return None


def resolve_store_references(text: str, store_url: str) -> str:
    """The YAML with every model reference that is a complete artifact of the store replaced
    by the absolute local folder holding it; other references are left as they are."""
    from fusechat_core.store import ArtifactStore

    store = ArtifactStore(store_url)
    raw = yaml.safe_load(text)
    cache: dict[str, str] = {}

    def local(ref: str) -> str:
        if ref not in cache:
            name, _, rest = ref.partition("+")  # mergekit's model+lora form
            if not Path(name).exists() and store.manifest(name) is not None:
                cache[ref] = str(store.fetch(name).resolve()) + (f"+{rest}" if rest else "")
            else:
                cache[ref] = ref
        return cache[ref]

    def walk(node: Any, key: str | None = None) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, key) for v in node]
        if isinstance(node, str) and key in ("model", "base_model", "tokenizer_source"):
            return local(node)
        return node

    return yaml.safe_dump(walk(raw), sort_keys=False)


def main(argv: Sequence[str] | None = None) -> int:
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from fusechat_core.determinism import pin_compute
    from fusechat_core.merge import varm

    varm.register()
    # the compute settings every fusechat merge runs with (one intra-op thread, deterministic
    # kernels): VaRM's weights are sums whose rounding depends on the thread count
    pin_compute()
    args = list(sys.argv[1:] if argv is None else argv)
    store_url = _pop_store(args)
    with tempfile.TemporaryDirectory(prefix="fusechat-mergekit-") as tmp:
        if store_url is not None:
            config = next((a for a in args if not a.startswith("-") and Path(a).is_file()), None)
            if config is None:
                print(f"{PROG}: error: --store given but no CONFIG_FILE found", file=sys.stderr)
                return 2
            resolved = Path(tmp) / Path(config).name
            resolved.write_text(resolve_store_references(Path(config).read_text(), store_url))
            args[args.index(config)] = str(resolved)
        try:
            mergekit_yaml.main(args=args, prog_name=PROG, standalone_mode=True)
        except SystemExit as exc:
            return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
