"""The Renderer: one model set loaded once per process, with the two seams the worker uses.

    renderer = Renderer.load(read_model_set("model-set.toml"))
    embeds = renderer.encode([reference_image])          # image encoder only (cacheable)
    image = renderer.generate(params, embeds)            # SDXL + IP-Adapter from embeddings

`generate_batch` renders several jobs that share a `batch_key()` in one pipeline call, each
item equal to its single run: it hands the UNet the `(2B, n, ...)` image embeddings itself
(diffusers mixes references up when a batch holds different images, upstream #9813), encodes
each prompt on its own, and draws each item's noise from its own CPU generator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import torch
from PIL import Image

from shared.errors import InvalidInput, ModelSetError
from shared.model_set import ModelSetConfig
from shared.spec import GenerationParams, parse_params
from worker import loading
from worker.loras import fuse_loras
from worker.weights import AdapterInfo, cast_adapter, describe_adapter, load_adapter_weights

log = logging.getLogger(__name__)

OnStep = Callable[[int], None]
Item = tuple[GenerationParams, Sequence[torch.Tensor]]
EmbedKind = Literal["image_embeds", "hidden_states"]

# scheduler name -> (diffusers class, config overrides on top of the base model's scheduler config)
SCHEDULER_CLASSES: Final[dict[str, tuple[str, dict[str, Any]]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    # Step-distilled sets: TCD-LoRA (diffusers' TCD docs), LCM-LoRA, SDXL-Lightning (Euler, trailing).
    "tcd": ("TCDScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "euler_trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
}
# The model set's scheduler options that go into the scheduler's config (the rest go to its step).
CONFIG_OPTIONS: Final = ("timestep_spacing",)


@dataclass
class _Prompts:
    """Per-item text embeddings, concatenated in batch order (negatives empty without CFG)."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    negative: torch.Tensor | None
    negative_pooled: torch.Tensor | None


class Renderer:
    """A loaded model set; build it once per process with `Renderer.load` and reuse it for every job."""

    def __init__(
        self,
        *,
        pipe: Any,
        encoder: Any,
        processor: Any,
        info: AdapterInfo,
        config: ModelSetConfig,
        encoder_id: str,
    ) -> None:
        self.pipe = pipe
        self.encoder = encoder
        self.processor = processor
        self.info = info
        self.config = config
        self.name: str = config.name
        self.encoder_id: str = encoder_id
        self.embed_kind: EmbedKind = "image_embeds" if info.kind == "plain" else "hidden_states"
        self.dtype: torch.dtype = pipe.unet.dtype
        self.device: torch.device = pipe.unet.device
        self._base_scheduler_config = dict(pipe.scheduler.config)
        self._schedulers: dict[str, Any] = {}
        self.encoder_swap_device: torch.device | None = None
        self._negative = self._negative_embedding()

    @classmethod
    def load(
        cls,
        config: ModelSetConfig,
        *,
        device: str = "auto",
        dtype: str = "auto",
        compile: bool = False,
        encoder_device: str | None = None,
        fuse_qkv: bool = False,
        channels_last: bool = False,
    ) -> Renderer:
        """Load base, adapter and image encoder; check that they fit together before touching the UNet."""
        # 1. Files and placement.
        config.check_files()
        main_device = loading.resolve_device(device)
        main_dtype = loading.resolve_dtype(dtype, main_device)
        enc_device = loading.resolve_device(encoder_device) if encoder_device else main_device
        enc_dtype = main_dtype if enc_device.type == "cuda" else torch.float32
        # 2. Adapter weights (safely) and the image encoder; their widths must agree.
        state = load_adapter_weights(config.ip_adapter)
        info = describe_adapter(state, path=config.ip_adapter)
        encoder, processor = loading.load_image_encoder(config, dtype=enc_dtype)
        loading.check_pairing(info, encoder, config=config)
        # 3. Base pipeline; the adapter must be made for its UNet.
        pipe = loading.load_base(config, dtype=main_dtype)
        loading.check_base(info, pipe.unet, config=config)
        # 4. Adapter into the UNet, through diffusers, from the state dict read in step 2.
        pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
        pipe.load_ip_adapter(cast_adapter(state, main_dtype), subfolder="", weight_name="", image_encoder_folder=None)
        # 5. LoRAs fused in once, after the adapter (whose attention processors they leave in place).
        fuse_loras(pipe, config)
        # 6. Placement, then the per-process extras.
        pipe.to(main_device)
        encoder.to(enc_device)
        if main_device.type == "cpu":
            for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, encoder):
                loading.materialize(module)
        pipe.set_progress_bar_config(disable=True)
        apply_fast_path(pipe, fuse_qkv=fuse_qkv, channels_last=channels_last, compile=compile)
        size = int(encoder.config.image_size)
        encoder_id = loading.encoder_identity(config, dtype=enc_dtype, processor=processor, image_size=size)
        log.info("model set %s loaded on %s (%s), adapter %s", config.name, main_device, main_dtype, info)
        return cls(pipe=pipe, encoder=encoder, processor=processor, info=info, config=config, encoder_id=encoder_id)

    def warm_up(self, *, batch_sizes: Sequence[int], width: int, height: int) -> None:
        """Render throwaway batches so that `torch.compile` compiles before the first job, not during it.

        Two distinct batch sizes (1 and the configured one) make torch.compile mark the batch
        dimension dynamic, so the sizes in between reuse the same graph; another image size
        compiles on its first job.
        """
        embeds = [self._negative.clone()]
        rules = self.config.rules
        # The set's own defaults (guidance decides the batch's shape), at the fewest steps it allows.
        steps = int(rules.ranges["steps"][0]) if "steps" in rules.ranges else 2
        raw = {**rules.defaults, "prompt": "warm-up", "seed": 0, "width": width, "height": height, "steps": steps}
        params = parse_params(raw)
        for size in sorted(set(batch_sizes)):
            self.generate_batch([(params, embeds)] * size, output="np")
        log.info("warm-up rendered batches of %s at %dx%d", sorted(set(batch_sizes)), width, height)

    # --- seam 1: the image encoder -------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """One CPU tensor per image: plain adapters (D,) projected embeds; plus (tokens, hidden) states.

        Each image is encoded on its own, so an embedding never depends on which images were
        encoded with it (it is cached by the image's hash).
        """
        # In `self.dtype` even when the encoder runs elsewhere (CPU fp32): the UNet casts to it anyway.
        with self._encoder_on_device():
            return [self._encode_pixels(self._pixels(image))[0].to("cpu", self.dtype) for image in images]

    @contextmanager
    def _encoder_on_device(self) -> Iterator[None]:
        """With placement "swap", the encoder visits the render GPU only for an encode (cache misses
        are rare), then goes back to host memory, leaving the GPU's memory to the UNet."""
        if self.encoder_swap_device is None:
            yield
            return
        self.encoder.to(self.encoder_swap_device)
        try:
            yield
        finally:
            self.encoder.to("cpu")
            if self.encoder_swap_device.type == "cuda":
                torch.cuda.empty_cache()

    @property
    def embed_shape(self) -> tuple[int, ...]:
        """Shape of one reference's embedding: (D,) for image_embeds, (tokens, hidden) for hidden_states."""
        return tuple(self._negative.shape)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        pixels: torch.Tensor = self.processor(image, return_tensors="pt").pixel_values
        return pixels

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(device=self.encoder.device, dtype=self.encoder.dtype)
        if self.embed_kind == "image_embeds":
            out: torch.Tensor = self.encoder(pixels).image_embeds
        else:
            out = self.encoder(pixels, output_hidden_states=True).hidden_states[-2]
        return out

    @torch.no_grad()
    def _negative_embedding(self) -> torch.Tensor:
        """Zeros for plain adapters; for plus, the encoder's answer to an all-zero input, as diffusers does."""
        size = int(self.encoder.config.image_size)
        zeros = torch.zeros(1, 3, size, size)
        negative: torch.Tensor = torch.zeros(self.info.embed_dim, dtype=self.dtype)
        if self.embed_kind == "hidden_states":
            negative = self._encode_pixels(zeros)[0].to("cpu", self.dtype)
        return negative

    # --- seam 2: generation ----------------------------------------------------------------------

    def generate(
        self, params: GenerationParams, embeds: Sequence[torch.Tensor], *, on_step: OnStep | None = None
    ) -> Image.Image:
        """One image from parameters and one embedding per reference image (their tokens concatenate)."""
        image: Image.Image = self.generate_batch([(params, embeds)], on_step=on_step)[0]
        return image

    def generate_batch(self, items: Sequence[Item], *, on_step: OnStep | None = None, output: str = "pil") -> list[Any]:
        """Render jobs sharing `batch_key()` and reference count in one call; PIL images or float arrays.

        `output="np"` gives HxWx3 float arrays in [0, 1] (for comparisons).
        """
        # 1. Check inputs before any model work.
        params = self._checked_items(items, output=output)
        first = params[0]
        cfg = self.uses_cfg(first)
        # 2. Pipeline state shared by the batch: scheduler and adapter scale.
        self.pipe.scheduler = self._scheduler(first.scheduler)
        self.pipe.set_ip_adapter_scale(first.block_scales())
        # 3. Per-item conditioning, assembled in batch order.
        prompts = self._encode_prompts(params, cfg=cfg)
        image_embeds = self._image_embeds([embeds for _, embeds in items], cfg=cfg)
        generators = [torch.Generator("cpu").manual_seed(p.seed) for p in params]
        # 4. Denoise and decode.
        with torch.no_grad(), _image_embeds_as_given(self.pipe, image_embeds):
            result = self.pipe(
                prompt_embeds=prompts.embeds,
                pooled_prompt_embeds=prompts.pooled,
                negative_prompt_embeds=prompts.negative,
                negative_pooled_prompt_embeds=prompts.negative_pooled,
                ip_adapter_image_embeds=[image_embeds],
                width=first.width,
                height=first.height,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                eta=self.config.rules.scheduler_options.get("eta", 0.0),
                generator=generators,
                output_type="np",
                callback_on_step_end=_step_callback(on_step),
            )
        # 5. Refuse broken numerics instead of returning a black image.
        arrays = self._checked_output(result.images)
        return arrays if output == "np" else [_to_pil(a) for a in arrays]

    def uses_cfg(self, params: GenerationParams) -> bool:
        """Whether the job runs two UNet passes a step (classifier-free guidance), as diffusers decides.

        Guidance <= 1 runs one pass, the image embeddings without their negative half; so does a
        guidance-embedded UNet (`time_cond_proj_dim`, e.g. a full LCM UNet), which takes the scale as input.
        """
        return params.guidance_scale > 1.0 and self.pipe.unet.config.time_cond_proj_dim is None

    def _checked_items(self, items: Sequence[Item], *, output: str) -> list[GenerationParams]:
        if output not in ("pil", "np"):
            raise ValueError(f"output must be 'pil' or 'np', not {output!r}")
        if not items:
            raise ValueError("generate_batch needs at least one item")
        # parse_params is the one validator; params may have been built without it.
        params = [parse_params(p.to_json()) for p, _ in items]
        counts = {len(embeds) for _, embeds in items}
        keys = {p.batch_key() for p in params}
        if len(keys) > 1 or len(counts) > 1:
            raise ValueError("a batch needs equal batch_key() and reference counts; render the jobs separately")
        # The set's limits again: a job may have named this set by name only, unchecked at submission.
        for p in params:
            self.config.rules.check(p, model_set=self.name)
        for _, embeds in items:
            self._check_embeds(embeds)
        return params

    def _check_embeds(self, embeds: Sequence[torch.Tensor]) -> None:
        if not embeds:
            raise InvalidInput("references", [], "must hold at least one reference image")
        expected = self.embed_shape
        for tensor in embeds:
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != expected:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise InvalidInput(
                    "reference embeddings",
                    shape,
                    f"must be {expected} ({self.embed_kind} of encoder {self.encoder_id}); re-encode the reference",
                )

    def _scheduler(self, name: str) -> Any:
        if name not in self._schedulers:
            import diffusers

            class_name, overrides = SCHEDULER_CLASSES[name]
            options = self.config.rules.scheduler_options
            # The name's own overrides win: `euler_trailing` is trailing whatever the set says.
            config = {key: options[key] for key in CONFIG_OPTIONS if key in options} | overrides
            scheduler_class = getattr(diffusers, class_name)
            self._schedulers[name] = scheduler_class.from_config(self._base_scheduler_config, **config)
        return self._schedulers[name]

    def _encode_prompts(self, params: Sequence[GenerationParams], *, cfg: bool) -> _Prompts:
        """Each prompt encoded alone, exactly as a single diffusers call would (empty negative -> zeros)."""
        parts = [
            self.pipe.encode_prompt(
                prompt=p.prompt,
                negative_prompt=p.negative_prompt or None,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=cfg,
            )
            for p in params
        ]
        embeds, negative, pooled, negative_pooled = (list(column) for column in zip(*parts, strict=True))
        return _Prompts(
            embeds=torch.cat(embeds),
            pooled=torch.cat(pooled),
            negative=torch.cat(negative) if cfg else None,
            negative_pooled=torch.cat(negative_pooled) if cfg else None,
        )

    def _image_embeds(self, per_item: Sequence[Sequence[torch.Tensor]], *, cfg: bool) -> torch.Tensor:
        """`(2B, n, ...)`: every item's negatives, then every item's references, as the UNet pairs them."""
        positive = torch.stack([torch.stack(list(embeds)) for embeds in per_item])
        batch = [positive]
        if cfg:
            batch.insert(0, self._negative.expand_as(positive))
        return torch.cat(batch).to(device=self.device, dtype=self.dtype)

    def _checked_output(self, images: np.ndarray) -> list[np.ndarray]:
        if np.isnan(images).any():
            raise ModelSetError(
                f"model set {self.name} produced NaN pixels in {self.dtype} (VAE or UNet overflow); "
                "set IPAB_DTYPE=bfloat16 or float32, or use the fp16-fix SDXL VAE"
            )
        return [np.asarray(image) for image in images]


def apply_fast_path(pipe: Any, *, fuse_qkv: bool, channels_last: bool, compile: bool) -> None:
    """The speed switches (each a setting), applied after the adapter is loaded.

    - fuse_qkv: one projection for q, k and v in the UNet's self-attention and the VAE's.
      Not diffusers' `unet.fuse_qkv_projections()`: that replaces every attention processor,
      the IP-Adapter's cross-attention ones included, which would drop the adapter.
    - channels_last: the UNet's and VAE's convolutions in NHWC (faster on tensor cores).
    - compile: `torch.compile` of the UNet and the VAE decoder (compiled at the first call;
      `Renderer.warm_up` makes that happen at worker start).
    SDPA attention (flash / memory-efficient kernels on a GPU) is diffusers' default in torch 2.
    """
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    fused_processor: Any = FusedAttnProcessor2_0
    if fuse_qkv:
        for module in [*pipe.unet.modules(), *pipe.vae.modules()]:
            if isinstance(module, Attention) and type(module.processor).__name__ == "AttnProcessor2_0":
                fused: Any = module  # diffusers leaves these untyped
                fused.fuse_projections(fuse=True)
                fused.set_processor(fused_processor())
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile:
        pipe.unet.compile(fullgraph=False)
        pipe.vae.decoder.compile(fullgraph=False)


@contextmanager
def _image_embeds_as_given(pipe: Any, image_embeds: torch.Tensor) -> Iterator[None]:
    """Make the pipeline use `image_embeds` exactly as assembled.

    diffusers' `prepare_ip_adapter_image_embeds` repeats the embeddings once per batch item
    (it is called with `batch_size * num_images_per_prompt` as the repeat count), which for a
    batch of B different references yields B*B rows that the attention then folds together:
    references leak between items (upstream #9813). For one item it is the identity, so the
    override changes nothing there. Instance attribute: the class stays untouched.
    """
    pipe.prepare_ip_adapter_image_embeds = lambda *args, **kwargs: [image_embeds]
    try:
        yield
    finally:
        del pipe.prepare_ip_adapter_image_embeds


def _step_callback(on_step: OnStep | None) -> Callable[..., dict[str, Any]] | None:
    if on_step is None:
        return None
    callback = on_step

    def call(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        callback(step)
        return tensors

    return call


def _to_pil(array: np.ndarray) -> Image.Image:
    """diffusers' own float -> 8-bit conversion (round half to even after x255)."""
    return Image.fromarray((array * 255).round().astype("uint8"))
