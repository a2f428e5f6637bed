"""``fusechat merge``: the run's merge on folders or hub ids, for users who already have targets.

Exit codes as the rest of ``fusechat``: 0 merged, 1 the merge failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help="varm, linear, slerp, task_arithmetic, ties, dare_linear or sce")
    p.add_argument("--pivot", required=True, metavar="DIR", help="the pivot: folder or hub id (its tokenizer is used)")
    p.add_argument("--targets", required=True, nargs="+", metavar="DIR",
                   help="the targets (fine-tunes of the pivot): folders or hub ids, optionally NAME=DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty or absent)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a method parameter (YAML value; a list gives one value per target), repeatable "
                        "(default: the method's defaults)")
    p.add_argument("--granularity", choices=("matrix", "layer", "model"), default="matrix", help="VaRM weights per")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="saved dtype")
    p.add_argument("--mergekit-yaml", metavar="FILE",
                   help="a mergekit config used as given (${pivot} and ${<target name>} are replaced; "
                        "default: one built from --method and --param)")
    p.add_argument("--shard-size", type=int, default=2_000_000_000, help="bytes per output shard")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the merge computes")
    p.add_argument("--seed", type=int, default=0, help="seed of the random methods (DARE)")
    p.add_argument("--tokenizer", help="tokenizer reference when the pivot folder has none (default: the pivot's)")
    p.add_argument("--chat-template", help="a registered chat template (default: the tokenizer's own)")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def _error(msg: str) -> int:
    print(f"fusechat: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--param {item!r}: value is not valid YAML") from None
    return out


def _targets(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, item in enumerate(items):
        name, sep, path = item.partition("=")
        if not sep or "/" in name or not name:
            name, path = Path(item.rstrip("/")).name or f"target{i}", item
        if name in out:
            name = f"{name}-{i}"
        out[name] = path
    return out


def merge_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from fusechat_core.config import MergeConfig
    from fusechat_core.merge.run import _check_ref, check_pivot_tokenizer, merge_models
    from fusechat_core.merge.translate import MergeError, check_merge_config
    from fusechat_core.models import ModelLoadError

    try:
        params = _params(args.param)
    except ValueError as exc:
        return _error(str(exc))
    targets = _targets(args.targets)
    yaml_text = None
    if args.mergekit_yaml:
        path = Path(args.mergekit_yaml)
        if not path.is_file():
            return _error(f"--mergekit-yaml: no such file: {path}")
        yaml_text = path.read_text()
    try:
        merge_cfg = MergeConfig(method=args.method, parameters=params, granularity=args.granularity,
                                dtype=args.dtype, mergekit_yaml=yaml_text, shard_size=args.shard_size,
                                device=args.device)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "method"
        msg = err["msg"].removeprefix("Value error, ")
        return _error(f"--{field.replace('_', '-')}: {msg}")
    try:
        check_pivot_tokenizer(_check_ref("--pivot", args.pivot), args.tokenizer)
        for name, path in targets.items():
            _check_ref(f"--targets ({name})", path)
        check_merge_config(merge_cfg, list(targets))
    except MergeError as exc:
        return _error(_as_flags(str(exc)))
    try:
        out = merge_models(args.method, args.pivot, targets, args.out, parameters=params,
                           granularity=args.granularity, dtype=args.dtype, mergekit_yaml=yaml_text,
                           shard_size=args.shard_size, device=args.device, seed=args.seed,
                           tokenizer=(args.tokenizer, None) if args.tokenizer else None,
                           chat_template=args.chat_template, progress=lambda m: print(m, file=sys.stderr))
    except (MergeError, ModelLoadError) as exc:
        print(f"fusechat: merge failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"merged {len(targets)} targets with {out['mergekit_method']} into {out['out_dir']}")
    if out["table"] is not None:
        s = out["table"]["summary"]
        print("VaRM mean weight by parameters: "
              + ", ".join(f"{t} {w:.4f}" for t, w in s["mean_weight"].items()))
    if args.json:
        summary = {k: out[k] for k in ("out_dir", "method", "mergekit_method")}
        if out["table"] is not None:
            summary["varm_summary"] = out["table"]["summary"]
        print(json.dumps(summary))
    return EXIT_OK


def _as_flags(message: str) -> str:
    """A run config's field names in ``message`` as this command's flags (``merge.granularity``
    as ``--granularity``, ``merge.parameters.density`` as ``--param density``); a path that
    happens to hold ``merge.`` (``./merge.v2/b``) is left as it is."""
    message = re.sub(r"(?<![\w./~-])merge\.parameters\.", "--param ", message)
    return re.sub(r"(?<![\w./~-])merge\.(?=[a-z_])", "--", message)
