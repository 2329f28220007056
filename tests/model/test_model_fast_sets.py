"""A fast model set end to end: what its record and PNG say (every LoRA's sha256 and scale), its
export columns, `ipab reproduce` of its job, one cached embedding serving jobs with and without
guidance, and `ipab generate` taking the set's defaults and refusing what its limits refuse."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from redis import Redis

from scheduler.export.samples import provenance_columns
from shared.errors import ObjectMissing
from shared.model_set import LoraFile, read_model_set
from shared.spec import JobSpec, Reference
from tests.model.conftest import job, png_bytes, reference_image
from worker.png import encode_png
from worker.provenance import Provenance, model_set_hashes, setting_differences
from worker.reproduce import JobRecord, compare_pngs, render_again

Renderers = Callable[[str], Any]
LORA = "loras/tiny-tcd-lora.safetensors"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class MemoryStore:
    """Object storage in a dict (references, embeddings)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def get(self, key: str) -> bytes:
        if key not in self.objects:
            raise ObjectMissing(key)
        return self.objects[key]

    def put(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None, content_type: str = "") -> None:
        self.objects[key] = data

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)


def _fast_png(renderer: Any, params: Any, reference: Image.Image) -> tuple[bytes, Provenance]:
    record = Provenance.of(renderer, hashes=model_set_hashes(renderer.config))
    image = renderer.generate(params, renderer.encode([reference]))
    return encode_png(image, params=params, model_set=renderer.name, provenance=record), record


def test_the_record_holds_every_loras_sha256_and_scale_and_the_sets_scheduler_options(
    renderer_for: Renderers, tiny_dir: Path
) -> None:
    renderer = renderer_for("fast")
    record = Provenance.of(renderer, hashes=model_set_hashes(renderer.config))
    digest = sha256_of(tiny_dir / LORA)
    assert record.files[LORA] == digest  # hashed with the set's other files: `ipab reproduce` compares it
    assert record.loras == [{"name": "tiny-tcd-lora", "sha256": digest, "scale": 1.0}]
    assert record.scheduler_options == {"eta": 0.3}
    assert json.loads(record.to_text())["loras"] == record.loras
    # The export's provenance columns carry them, as JSON text.
    columns = provenance_columns(record.to_json())
    assert json.loads(columns["loras"]) == record.loras
    plain = renderer_for("default")
    assert provenance_columns(Provenance.of(plain, hashes=model_set_hashes(plain.config)).to_json())["loras"] == "[]"


def test_the_png_says_lora_hashes_as_a1111_writes_them_and_sd_parsers_reads_them(
    renderer_for: Renderers, tiny_dir: Path
) -> None:
    sd_parsers = pytest.importorskip("sd_parsers")
    renderer = renderer_for("fast")
    params = job(prompt="a fox", seed=7, scheduler="tcd", guidance_scale=0.0)
    data, record = _fast_png(renderer, params, reference_image(50))
    text = Image.open(io.BytesIO(data)).text  # type: ignore[attr-defined]
    short = sha256_of(tiny_dir / LORA)[:10]
    assert text["parameters"].splitlines()[-1] == (
        f"Steps: 4, Sampler: TCD, CFG scale: 0, Seed: 7, Size: 64x64, Model hash: {record.model_hash}, "
        f'Model: tiny-fast, IP-Adapter scale: 0.6, Lora hashes: "tiny-tcd-lora: {short}", '
        f'Hashes: {{"model": "{record.model_hash}", "lora:tiny-tcd-lora": "{short}"}}, '
        f"Version: ipab {record.versions['ipab']}"
    )
    info = sd_parsers.ParserManager().parse(Image.open(io.BytesIO(data)))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    assert info.metadata["Hashes"] == {"model": record.model_hash, "lora:tiny-tcd-lora": short}
    sampler = info.samplers[0]
    assert sampler.name == "TCD" and sampler.parameters["cfg_scale"] == "0"
    assert (sampler.model.name, sampler.model.hash) == ("tiny-fast", record.model_hash)
    assert json.loads(text["ipab"])["provenance"]["loras"] == record.loras


def test_a_fast_sets_job_is_reproduced_from_its_record(renderer_for: Renderers) -> None:
    renderer = renderer_for("fast")
    reference = png_bytes(reference_image(51))
    sha = hashlib.sha256(reference).hexdigest()
    store = MemoryStore()
    store.put(f"refs/{sha}.png", reference)
    params = job(prompt="a lighthouse", seed=12, scheduler="tcd", guidance_scale=0.0)
    spec = JobSpec(params=params, references=(Reference(sha256=sha, key=f"refs/{sha}.png"),))
    from shared.images import decode_reference

    original, record = _fast_png(renderer, params, decode_reference(reference))
    job_record = JobRecord("job-1", spec, "outputs/b/job-1.png", hashlib.sha256(original).hexdigest(), record.to_json())
    hashes = model_set_hashes(renderer.config)
    assert compare_pngs(original, render_again(renderer, job_record, store, hashes)).verdict == "identical bytes"
    # Another LoRA scale or scheduler option here than in the record: not rendered, said why.
    assert setting_differences(record.to_json(), renderer.config) == []
    halved = replace(renderer.config, loras=(LoraFile(renderer.config.loras[0].path, 0.5),))
    assert setting_differences(record.to_json(), halved) == ["LoRA tiny-tcd-lora: scale 0.5 here, 1.0 in the record"]


class CountingEncoder:
    """The renderer's encoder, counting its encodes (the embedding cache's `Encoder`)."""

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer
        self.calls = 0
        self.encoder_id, self.embed_kind, self.dtype = renderer.encoder_id, renderer.embed_kind, renderer.dtype
        self.embed_shape = renderer.embed_shape

    def encode(self, images: Any) -> Any:
        self.calls += 1
        return self.renderer.encode(images)


def test_one_cached_embedding_serves_jobs_with_and_without_guidance(renderer_for: Renderers, redis_url: str) -> None:
    from worker.embedding import EmbeddingCache

    renderer = renderer_for("fast")
    encoder, store, prefix = CountingEncoder(renderer), MemoryStore(), f"t{uuid.uuid4().hex[:8]}:"
    limits = {"lru_bytes": 1 << 20, "redis_ttl_s": 600, "lock_ttl_s": 10.0, "wait_s": 30.0}
    cache = EmbeddingCache(redis=Redis.from_url(redis_url), store=store, encoder=encoder, prefix=prefix, **limits)
    data = png_bytes(reference_image(52))
    ref = (hashlib.sha256(data).hexdigest(), lambda: data)
    without, guided = job(scheduler="tcd", guidance_scale=0.0), job(scheduler="tcd", guidance_scale=1.5)
    (first,), _ = cache.get([ref])
    one_pass = renderer.generate_batch([(without, [first])], output="np")[0]
    (again,), stats = cache.get([ref])
    two_passes = renderer.generate_batch([(guided, [again])], output="np")[0]
    assert encoder.calls == 1 and stats.lru_hits == 1  # one entry, one encode, for both
    assert len(list(Redis.from_url(redis_url).scan_iter(match=f"{prefix}emb:*"))) == 1
    assert len([key for key in store.objects if key.startswith("embeddings/")]) == 1
    # Each is the image diffusers makes from the picture itself with that guidance.
    for params, ours in ((without, one_pass), (guided, two_passes)):
        renderer.pipe.set_ip_adapter_scale(0.6)
        expected = renderer.pipe(
            prompt=params.prompt,
            ip_adapter_image=reference_image(52),
            width=64,
            height=64,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            eta=0.3,
            generator=torch.Generator().manual_seed(params.seed),
            output_type="np",
        ).images[0]
        assert np.abs(ours - expected).max() <= 1e-5


def test_ipab_generate_takes_the_sets_defaults_for_what_the_command_line_leaves_out(tiny_sets: dict[str, Path]) -> None:
    from worker.commands import generation_params

    rules = read_model_set(tiny_sets["fast"]).rules
    fields = ("negative_prompt", "width", "height", "steps", "guidance_scale", "scheduler", "ip_adapter_scale")
    args = argparse.Namespace(prompt="a fox", seed=3, **dict.fromkeys(fields))
    params = generation_params(args, rules=rules)
    assert (params.scheduler, params.steps, params.guidance_scale) == ("tcd", 4, 0.0)
    params = generation_params(argparse.Namespace(**{**vars(args), "steps": 6}), rules=rules)
    assert params.steps == 6


def test_ipab_generate_outside_the_sets_limits_exits_2_with_the_reason_before_loading_a_model(
    tmp_path: Path, tiny_sets: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ipab.cli import main
    from worker.pipeline import Renderer

    loads: list[Any] = []
    monkeypatch.setattr(Renderer, "load", lambda *args, **kwargs: loads.append(args))
    reference, out = tmp_path / "ref.png", tmp_path / "out.png"
    reference_image(61).save(reference)
    argv = ["generate", "--model-set", str(tiny_sets["fast"]), "--reference", str(reference), "--prompt", "a fox"]
    assert main([*argv, "--steps", "30", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "`steps` is 30: must be 2 to 8 on model set 'tiny-fast'" in error, error
    assert loads == [] and not out.exists()
