"""`ipab models download`, `ipab generate` and `ipab reproduce`: model sets, one job rendered locally,
and a finished job rendered again from its record (`worker.reproduce`).

`ipab generate` takes exactly the worker's path (decode_reference -> Renderer.encode ->
Renderer.generate -> encode_png), so what it shows is what a bulk run will produce.
No torch at import time: every handler imports the heavy parts itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from shared.errors import InvalidInput
from shared.scheduler_names import SCHEDULERS

if TYPE_CHECKING:
    from shared.model_set import ModelSetConfig
    from shared.model_set_rules import SetRules
    from shared.settings import Settings
    from shared.spec import GenerationParams
    from shared.storage import ObjectStore
    from worker.provenance import ModelSetHashes
    from worker.reproduce import JobRecord, Outcome

# The choices of `--preset`, light for the parser: `worker.download.PRESETS` holds what each one
# downloads (tests/scheduler/cli/test_startup_imports.py holds the two to the same names).
PRESET_NAMES: Final = ("tcd", "lcm", "lightning-4step", "lightning-8step")


def register(subparsers: Any) -> None:
    """Add `ipab models download`, `ipab generate` and `ipab reproduce`."""
    models: argparse.ArgumentParser = subparsers.add_parser("models", help="fetch model sets")
    sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    download = sub.add_parser("download", help="fetch SDXL base + h94/IP-Adapter SDXL weights (needs a network)")
    download.add_argument("dir", type=Path)
    download.add_argument(
        "--variant",
        action="append",
        help="adapter variant (repeatable; default: all four, or ip-adapter_sdxl with --preset)",
    )
    download.add_argument("--skip-base", action="store_true", help="only adapters and encoders")
    download.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        help="a step-distilled set: its LoRA, scheduler, 4 or 8 steps, no guidance (model-set-PRESET.toml)",
    )
    download.set_defaults(func=cmd_download)
    _register_generate(subparsers)
    _register_reproduce(subparsers)


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


def _register_reproduce(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "reproduce", help="render a finished job again from its record; compare weights, bytes and pixels"
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--model-set", type=Path, help="model-set.toml (default: IPAB_MODEL_SET)")
    p.add_argument("--out", type=Path, help="write the re-rendered PNG here")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), help="default: the job's")
    p.add_argument("--rehash", action="store_true", help="hash every weight file again (ignore the sha256 cache)")
    p.set_defaults(func=cmd_reproduce)


def cmd_download(args: argparse.Namespace) -> int:
    """Fetch the public weights and write one model set per adapter variant (or the preset's set)."""
    from worker.download import DEFAULT_PRESET_VARIANT, VARIANT_ENCODERS, download_model_sets, download_preset

    if args.preset is not None:
        if args.variant and len(args.variant) > 1:
            raise InvalidInput("--variant", args.variant, "takes one variant with --preset")
        variant = args.variant[0] if args.variant else DEFAULT_PRESET_VARIANT
        path = download_preset(args.dir, args.preset, variant=variant, base=not args.skip_base)
        print(f"  {args.preset}: {path}")
        return 0
    variants = tuple(args.variant or VARIANT_ENCODERS)
    paths = download_model_sets(args.dir, variants=variants, base=not args.skip_base)
    for variant, path in paths.items():
        print(f"  {variant}: {path}")
    return 0


def generation_params(args: argparse.Namespace, *, rules: SetRules | None = None) -> GenerationParams:
    """The job's parameters from the command line, validated by the one validator (`parse_params`);
    what the command line leaves out comes from the model set's `[defaults]` (`rules`)."""
    import secrets

    from shared.spec import SEED_LIMIT, parse_params

    defaults = {} if rules is None else rules.defaults
    raw: dict[str, Any] = {
        "prompt": args.prompt,
        "seed": secrets.randbelow(SEED_LIMIT) if args.seed is None else args.seed,
    }
    for name in ("negative_prompt", "width", "height", "steps", "guidance_scale", "scheduler"):
        if getattr(args, name) is not None:
            raw[name] = getattr(args, name)
    if args.ip_adapter_scale is not None:
        raw["ip_adapter_scale"] = _adapter_scale_arg(args.ip_adapter_scale)
    return parse_params({**defaults, **raw})


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
    config = read_model_set(args.model_set, check_files=True)
    params = generation_params(args, rules=config.rules)
    config.rules.check(params, model_set=config.name)
    images = [decode_reference(_read_reference(path), field=f"reference {path}") for path in args.reference]
    # 2. The worker's path: encode, generate, PNG.
    from worker.pipeline import Renderer
    from worker.png import encode_png
    from worker.provenance import Provenance, model_set_hashes

    renderer = Renderer.load(config, device=args.device, dtype=args.dtype)
    image = renderer.generate(params, renderer.encode(images))
    provenance = Provenance.of(renderer, hashes=model_set_hashes(config))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(encode_png(image, params=params, model_set=renderer.name, provenance=provenance))
    print(f"wrote {args.out} (seed {params.seed})", file=sys.stderr)
    return 0


def _read_reference(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InvalidInput("reference", str(path), f"cannot be read ({e.strerror}); give an image file") from None


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Render a finished job again from SQL and S3 with the local model set; 0 when the pixels match."""
    from shared.db import make_engine, make_session_factory
    from shared.model_set import read_model_set
    from shared.settings import load_settings, require_model_set
    from shared.storage import ObjectStore
    from worker import reproduce as r
    from worker.provenance import model_set_hashes, setting_differences

    # 1. The record, and the local weights (LoRA scales, scheduler options) against it: no rendering
    #    with other weights.
    settings = load_settings()
    config = read_model_set(args.model_set or require_model_set(settings), check_files=True)
    engine = make_engine(settings.database_url)
    try:
        record = r.load_record(make_session_factory(engine), args.job_id)
    finally:
        engine.dispose()
    hashes = model_set_hashes(config, use_cache=not args.rehash)
    for note in r.model_set_note(record, config):
        print(f"note: {note}", file=sys.stderr)
    if differences := r.weight_differences(record, hashes):
        return _report(args.job_id, r.Outcome("weights differ", details=differences))
    if record.provenance is not None and (differences := setting_differences(record.provenance, config)):
        return _report(args.job_id, r.Outcome("settings differ", details=differences))
    # 2. The worker's path on the recorded dtype and threads, then bytes and pixels compared.
    store = ObjectStore.from_settings(settings)
    original = r.original_png(store, record)
    outcome = r.compare_pngs(original, _render_again(args, settings, config, record, store, hashes))
    if args.out is not None and outcome.png is not None:
        r.write_png(args.out, outcome.png)
    return _report(args.job_id, outcome)


def _render_again(
    args: argparse.Namespace,
    settings: Settings,
    config: ModelSetConfig,
    record: JobRecord,
    store: ObjectStore,
    hashes: ModelSetHashes,
) -> bytes:
    """The job rendered again through the worker's path, on the recorded dtype and CPU threads."""
    from worker import reproduce as r
    from worker.pipeline import Renderer

    r.use_recorded_threads(record)
    renderer = Renderer.load(
        config,
        device=args.device,
        dtype=args.dtype or r.recorded_dtype(record, "auto"),
        encoder_device="cpu" if settings.encoder_placement in ("cpu", "swap") else None,
    )
    return r.render_again(renderer, record, store, hashes)


def _report(job_id: str, outcome: Outcome) -> int:
    """Print the verdict (and its details); exit 0 only when the recorded pixels came out again."""
    line = f"job {job_id}: {outcome.verdict}"
    if outcome.verdict == "pixels differ" and outcome.max_pixel_diff is not None:
        line += f": max pixel difference {outcome.max_pixel_diff} (of 255)"
    print(line)
    for detail in outcome.details:
        print(f"  {detail}")
    return 0 if outcome.reproduced else 1
