"""`ipab models download` and `ipab generate`: model sets, and one job rendered locally.

`ipab generate` takes exactly the worker's path (decode_reference -> Renderer.encode ->
Renderer.generate -> encode_png), so what it shows is what a bulk run will produce.
No torch at import time: every handler imports the heavy parts itself.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path
from typing import Any

from shared.errors import InvalidInput
from shared.spec import SCHEDULERS, SEED_LIMIT, GenerationParams, parse_params


def register(subparsers: Any) -> None:
    """Add `ipab models download` and `ipab generate`."""
    models: argparse.ArgumentParser = subparsers.add_parser("models", help="fetch model sets")
    sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    download = sub.add_parser("download", help="fetch SDXL base + h94/IP-Adapter SDXL weights (needs a network)")
    download.add_argument("dir", type=Path)
    download.add_argument("--variant", action="append", help="adapter variant (repeatable; default: all four)")
    download.add_argument("--skip-base", action="store_true", help="only adapters and encoders")
    download.set_defaults(func=cmd_download)
    _register_generate(subparsers)


def _register_generate(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser("generate", help="render one job locally to a PNG (no queue)")
    p.add_argument("--model-set", type=Path, required=True, help="model-set.toml")
    p.add_argument("--reference", type=Path, action="append", required=True, help="reference image (repeatable)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--seed", type=int, help="default: a random seed, printed")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--ip-adapter-scale", help="a number, a preset (style, style_and_layout) or JSON per-block scales")
    p.add_argument("--scheduler", help=f"one of {', '.join(SCHEDULERS)}")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"))
    p.set_defaults(func=cmd_generate)


def cmd_download(args: argparse.Namespace) -> int:
    """Fetch the public weights and write one model set per adapter variant."""
    from worker.download import VARIANT_ENCODERS, download_model_sets

    variants = tuple(args.variant or VARIANT_ENCODERS)
    paths = download_model_sets(args.dir, variants=variants, base=not args.skip_base)
    for variant, path in paths.items():
        print(f"  {variant}: {path}")
    return 0


def generation_params(args: argparse.Namespace) -> GenerationParams:
    """The job's parameters from the command line, validated by the one validator (`parse_params`)."""
    raw: dict[str, Any] = {
        "prompt": args.prompt,
        "seed": secrets.randbelow(SEED_LIMIT) if args.seed is None else args.seed,
    }
    for name in ("negative_prompt", "width", "height", "steps", "guidance_scale", "scheduler"):
        if getattr(args, name) is not None:
            raw[name] = getattr(args, name)
    if args.ip_adapter_scale is not None:
        raw["ip_adapter_scale"] = _adapter_scale_arg(args.ip_adapter_scale)
    return parse_params(raw)


def _adapter_scale_arg(text: str) -> Any:
    if not text.lstrip().startswith("{"):
        return text  # a number or a preset name; parse_params decides
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(
            "ip_adapter_scale", text, f'is not valid JSON ({e.msg}); e.g. \'{{"up": {{"block_0": [0, 1, 0]}}}}\''
        ) from None


def cmd_generate(args: argparse.Namespace) -> int:
    """Render one job through the worker's path and write the PNG."""
    from shared.images import decode_reference
    from shared.model_set import read_model_set

    # 1. Check every input before loading any model.
    params = generation_params(args)
    images = [decode_reference(_read_reference(path), field=f"reference {path}") for path in args.reference]
    config = read_model_set(args.model_set, check_files=True)
    # 2. The worker's path: encode, generate, PNG.
    from worker.pipeline import Renderer
    from worker.png import encode_png

    renderer = Renderer.load(config, device=args.device, dtype=args.dtype)
    image = renderer.generate(params, renderer.encode(images))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(encode_png(image, params=params, model_set=renderer.name))
    print(f"wrote {args.out} (seed {params.seed})", file=sys.stderr)
    return 0


def _read_reference(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InvalidInput("reference", str(path), f"cannot be read ({e.strerror}); give an image file") from None
