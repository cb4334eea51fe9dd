"""Text-to-image, image-to-image and inpainting with SDXL Base + Refiner as an ensemble of
experts, optionally with LoRAs, one request or several batched together."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Literal, overload

import PIL.Image
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
    retrieve_latents,
)
from diffusers.utils.torch_utils import randn_tensor

import sdxl_engine.generation.inpaint as inpaint
from sdxl_engine.errors import EngineError
from sdxl_engine.generation.conditioning import base_encoding, refiner_encoding
from sdxl_engine.generation.merge import AppliedLora
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.lora_keys import TEXT_ENCODERS
from sdxl_engine.parameters import DEFAULT_REFINER_SWITCH, GenerationParams, problems_text
from sdxl_engine.schedulers import build_scheduler


def generate(
    pipelines: Pipelines,
    *,
    loras: Sequence[AppliedLora] = (),
    on_step: Callable[[int, int], None] | None = None,
    **params: Any,
) -> list[PIL.Image.Image]:
    """The images of one request, GenerationParams(**params) (its seed given), the same for
    the same seed; `loras` and `on_step` are generate_batch's."""
    return generate_batch(pipelines, [GenerationParams(**params)], loras=loras, on_step=on_step)[0]


@overload
def generate_batch(
    pipelines: Pipelines,
    requests: Sequence[GenerationParams],
    *,
    loras: Sequence[AppliedLora] = (),
    on_step: Callable[[int, int], None] | None = None,
    init_latents: torch.Tensor | None = None,
    output_type: Literal["pil"] = "pil",
) -> list[list[PIL.Image.Image]]: ...


@overload
def generate_batch(
    pipelines: Pipelines,
    requests: Sequence[GenerationParams],
    *,
    loras: Sequence[AppliedLora] = (),
    on_step: Callable[[int, int], None] | None = None,
    init_latents: torch.Tensor | None = None,
    output_type: Literal["latent"],
) -> list[torch.Tensor]: ...


def generate_batch(
    pipelines: Pipelines,
    requests: Sequence[GenerationParams],
    *,
    loras: Sequence[AppliedLora] = (),
    on_step: Callable[[int, int], None] | None = None,
    init_latents: torch.Tensor | None = None,
    output_type: Literal["pil", "latent"] = "pil",
) -> list[list[PIL.Image.Image]] | list[torch.Tensor]:
    """The images of each request, made together in one batch: Base and Refiner run once
    for all of them, which costs less per image than one run per request. The requests
    share their batch_key (size, schedule, sampler, guidance, Refiner, strength); each has
    its prompts, image count, seed and, for img2img, starting image, and gets the images it
    would get alone (the same starting noise; the arithmetic of a larger batch may differ
    in the last bits of float16). Image i of a request starts from noise of its own seed
    (GenerationParams.seeds), drawn the way stock diffusers draws it for a list of
    generators. The requests are checked first (check_inputs): they must be filled
    (GenerationParams.filled). Their output format and quality do not apply here.

    Prompts are read in their `prompt_syntax` and encoded in 75-token chunks with their
    attention weights (conditioning.base_encoding). Requests whose embeddings differ in
    length (prompts of more chunks) run Base and Refiner once per length, so each gets the
    images it would alone; `on_step` then counts the steps of every run.

    `loras` apply to the Base (UNet and text encoders) for this call only, added together
    at their scales: merged into the weights and restored afterwards, so the next call
    without them matches a freshly loaded pipeline. The Refiner never sees them.
    `on_step(done, steps)` runs after each denoising step of Base and Refiner together; it
    stops the call between steps by raising GenerationCancelled (any exception does: the
    schedulers and weights are restored either way, ready for the next call).

    `scheduler` (a name of schedulers.SCHEDULERS) drives Base and Refiner for this call
    only; None keeps the pipelines' own (the model folder's: Euler for SDXL), untouched.

    `refiner` "ensemble": the Base denoises the first `refiner_switch` of the schedule and
    the Refiner the rest; "none": the Base alone runs every step and its latents are
    decoded, the Refiner is not called.

    `strength` (img2img, every request has an init_image): the fraction of the schedule
    run on each request's image after noising it, as diffusers'
    StableDiffusionXLImg2ImgPipeline does; under "ensemble" the Base runs the first
    `refiner_switch` of those steps and the Refiner the rest, as AUTOMATIC1111 splits
    them. At 1 the image is not used at all: the result is the text-to-image one for the
    seed.

    A request without `width` and `height` renders at the model's native size (native_side),
    or for img2img at its image's aspect ratio (GenerationParams.sized).

    Inpainting (a `mask`, or `outpaint` margins; every request of the batch alike, each
    with its own mask): the img2img above through diffusers' inpaint pipeline, the area
    outside the mask kept (generation.inpaint); outpainting renders the grown canvas
    (GenerationParams.canvas_size). A Base with an inpainting UNet renders every request
    this way (inpaint.as_inpainting).

    `init_latents` (the hires fix's "latent" upscaler): img2img from these latents, one per
    image of the requests in order, instead of each request's init_image; the requests
    then carry their strength without an init_image. `output_type` "latent": each
    request's final latents (one tensor per request, before the VAE) instead of images.
    """
    native = native_side(pipelines)
    requests = [request.sized(native) for request in requests]
    if inpaint.is_inpainting_unet(pipelines):
        # An inpainting Base (9-channel UNet) renders every request as inpainting.
        requests = [inpaint.as_inpainting(request) for request in requests]
    # Starting latents stand in for the init_image that strength otherwise needs.
    check_inputs(
        pipelines,
        requests if init_latents is None else [replace(r, init_image=b"") for r in requests],
    )
    shared = requests[0]
    steps, guidance_scale, strength = shared.steps, shared.guidance_scale, shared.strength
    ensemble = shared.refiner_policy == "ensemble"
    img2img = strength is not None and strength < 1.0
    # Where the Base hands over, as a fraction of the whole schedule; diffusers ignores a
    # denoising_start that is not a float.
    refiner_switch = shared.refiner_switch_at or DEFAULT_REFINER_SWITCH
    handover = float(
        refiner_switch if strength is None or not img2img else 1 - strength * (1 - refiner_switch)
    )
    if init_latents is not None and (
        not img2img or len(init_latents) != sum(request.num_images for request in requests)
    ):
        raise EngineError("init_latents needs a strength under 1 and one latent per image")
    base, refiner_pipe = pipelines.base, pipelines.refiner
    if refiner_pipe is None:
        raise EngineError(
            "these pipelines were loaded for training, without the SDXL Refiner; "
            "load them with purpose='generation' to generate"
        )
    # Once the native size's graphs are compiled, a call the compiled code has not seen
    # runs eagerly: seconds slower, instead of a compile that would hold the request for
    # minutes. Other shapes replay CUDA graphs (graphs.UNetGraphs).
    stance = "eager_on_recompile" if pipelines.warmed_up else "default"
    own_schedulers = base.scheduler, refiner_pipe.scheduler
    try:
        # The text encoders carry the LoRAs only while the Base's prompts are encoded:
        # text_encoder_2 is shared with the Refiner, which must not see them.
        pipelines.loras.merge(loras)
        with torch.no_grad(), torch.compiler.set_stance(stance):
            encodings = [
                base_encoding(pipelines, request, guidance_scale > 1.0) for request in requests
            ]
            pipelines.loras.restore(TEXT_ENCODERS)
            # The Refiner runs without CFG (guidance 1.0): one prompt encoding per image,
            # matching the latents' batch.
            refiner_encodings = [
                refiner_encoding(refiner_pipe, request, pipelines.device) if ensemble else None
                for request in requests
            ]
            # Prompts of more 75-token chunks make longer embeddings: requests of each
            # length denoise together, so that each gets the images it would alone.
            groups = _length_groups(encodings, refiner_encodings)
            report_step = _step_reporter(steps * len(groups), on_step)
            # Each request's rows of init_latents (one per image, the requests in order).
            image_rows = _image_rows(requests)
            results: list[Any] = [None] * len(requests)
            for group in groups:
                group_results = _render_group(
                    pipelines,
                    [requests[index] for index in group],
                    _concatenated(encodings[index] for index in group),
                    [refiner_encodings[index] for index in group],
                    report_step,
                    handover,
                    own_schedulers,
                    init_latents=None
                    if init_latents is None
                    else torch.cat([init_latents[image_rows[index]] for index in group]),
                    output_type=output_type,
                )
                for index, result in zip(group, group_results, strict=True):
                    results[index] = result
    finally:
        # The pipelines are shared by every request: the next one without a scheduler
        # must find the model's own, the next without LoRAs the model's own weights.
        base.scheduler, refiner_pipe.scheduler = own_schedulers
        pipelines.loras.restore()
    return results


def _image_rows(requests: Sequence[GenerationParams]) -> list[slice]:
    """Each request's images' rows in a batch of all the requests' images, in order."""
    rows, start = [], 0
    for request in requests:
        rows.append(slice(start, start + request.num_images))
        start += request.num_images
    return rows


def _length_groups(
    encodings: Sequence[tuple[torch.Tensor | None, ...]],
    refiner_encodings: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
) -> list[list[int]]:
    """The requests' indices by the lengths of their prompt embeddings (Base's, and the
    Refiner's when it runs), in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (encoding, refined) in enumerate(zip(encodings, refiner_encodings, strict=True)):
        lengths = [
            tensor.shape[1] for tensor in encoding if tensor is not None and tensor.ndim == 3
        ]
        if refined is not None:
            lengths.append(refined[0].shape[1])
        groups.setdefault(tuple(lengths), []).append(index)
    return list(groups.values())


def _render_group(
    pipelines: Pipelines,
    requests: Sequence[GenerationParams],
    embeddings: list[torch.Tensor | None],
    refiner_encodings: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
    report_step: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]],
    handover: float,
    own_schedulers: tuple[Any, Any],
    *,
    init_latents: torch.Tensor | None,
    output_type: str,
) -> list[Any]:
    """The images of requests whose embeddings have one length: one run of Base and
    Refiner for all of them (generate_batch's), one decode per request; or, for
    output_type "latent", each request's final latents."""
    shared = requests[0]
    # Outpainting renders the grown canvas; every other request its size.
    (width, height), steps = shared.canvas_size, shared.steps
    guidance_scale, scheduler, strength = shared.guidance_scale, shared.scheduler, shared.strength
    ensemble = shared.refiner_policy == "ensemble"
    img2img = strength is not None and strength < 1.0
    # Inpainting (a mask or outpaint): each request's pixels prepared first (inpaint.prepare).
    jobs = [inpaint.prepare(request) for request in requests] if shared.inpainting else None
    base, refiner_pipe = pipelines.base, pipelines.refiner
    assert refiner_pipe is not None  # generate_batch checked
    prompt_embeds, negative_embeds, pooled, negative_pooled = embeddings
    if scheduler is not None:
        seeds = _noise_seeds(requests)
        base.scheduler = build_scheduler(scheduler, own_schedulers[0].config, seeds)
        refiner_pipe.scheduler = build_scheduler(scheduler, own_schedulers[1].config, seeds)
    generators = [
        torch.Generator(pipelines.device).manual_seed(seed)
        for request in requests
        for seed in request.seeds
    ]
    # A scheduler that draws noise in its steps (euler_a) draws each image's from
    # its generator, which drew its starting noise: an image does not depend on
    # its batch. Without a scheduler txt2img gets none, as before the field.
    step_noise = (
        {"generator": generators} if scheduler is not None or img2img or jobs is not None else {}
    )
    base_stage = dict(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
        guidance_scale=guidance_scale,
        num_inference_steps=steps,
        # None: the whole schedule (stock diffusers' Base alone).
        denoising_end=handover if ensemble else None,
        output_type="latent",
        callback_on_step_end=report_step,
        **step_noise,
    )
    inpainting = None
    if jobs is not None:
        assert strength is not None, "check_inputs: inpainting has an init_image"
        inpainting = inpaint.inputs(pipelines, requests, jobs, generators)
        latents = inpaint.base_pass(
            pipelines, inpainting, strength=strength, height=height, width=width, stage=base_stage
        )
    elif img2img:
        start = (
            _init_latents(pipelines, requests, height, width, generators)
            if init_latents is None
            else init_latents.to(pipelines.device, pipelines.dtype)
        )
        latents = _img2img_of(base)(image=start, strength=strength, **base_stage).images
    else:
        latents = base(
            latents=_starting_noise(pipelines, height, width, generators),
            height=height,
            width=width,
            **base_stage,
        ).images
    if ensemble:
        refiner_embeds, refiner_pooled = _concatenated(
            encoding for encoding in refiner_encodings if encoding is not None
        )
        refiner_stage = dict(
            prompt_embeds=refiner_embeds,
            pooled_prompt_embeds=refiner_pooled,
            num_inference_steps=steps,
            denoising_start=handover,
            guidance_scale=1.0,
            output_type="latent",
            callback_on_step_end=report_step,
            **step_noise,
        )
        if inpainting is not None:
            refined = inpaint.refiner_pass(
                pipelines, inpainting, latents, height=height, width=width, stage=refiner_stage
            )
        else:
            refined = refiner_pipe(image=latents, **refiner_stage).images
    else:
        refined = latents
    if output_type == "latent":
        return list(refined.split([request.num_images for request in requests]))
    # One decode per request: the VAE's memory grows with its batch, and a batch of
    # several requests must not need more than the largest of them alone.
    images = [
        decode_latents(pipelines, part)
        for part in refined.split([request.num_images for request in requests])
    ]
    if jobs is not None:
        # A1111's overlay: the original back outside the blurred mask.
        images = [
            [inpaint.finish(job, image) for image in request_images]
            for job, request_images in zip(jobs, images, strict=True)
        ]
    return images


def _img2img_of(base: StableDiffusionXLPipeline) -> StableDiffusionXLImg2ImgPipeline:
    """diffusers' img2img pipeline over the Base's own modules and its current scheduler.
    (Not `from_pipe`, which casts the modules to one dtype: the VAE stays float32.)"""
    pipeline = StableDiffusionXLImg2ImgPipeline(**base.components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _starting_noise(
    pipelines: Pipelines, height: int, width: int, generators: list[torch.Generator]
) -> torch.Tensor:
    """Text-to-image's starting noise, each image's from its own generator, drawn exactly
    as the pipeline draws it for a list of generators (on the device, in the UNet's dtype)."""
    base = pipelines.base
    shape = (
        len(generators),
        base.unet.config.in_channels,
        height // base.vae_scale_factor,
        width // base.vae_scale_factor,
    )
    device = torch.device(pipelines.device)
    noise: torch.Tensor = randn_tensor(
        shape, generator=generators, device=device, dtype=pipelines.dtype
    )
    return noise


def _init_latents(
    pipelines: Pipelines,
    requests: Sequence[GenerationParams],
    height: int,
    width: int,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Each image's starting image in latent space, ready for the img2img pipeline to
    noise: encoded with the float32 VAE and sampled with the image's generator, as
    StableDiffusionXLImg2ImgPipeline encodes an image for a list of generators (its own
    encoding would cast the shared VAE to float16 afterwards)."""
    vae, device = pipelines.base.vae, pipelines.device
    latents = []
    images = iter(generators)
    for request in requests:
        # check_inputs let these requests through together: each has its starting image.
        assert request.init_image is not None
        with PIL.Image.open(io.BytesIO(request.init_image)) as image:
            pixels = pipelines.base.image_processor.preprocess(
                image.convert("RGB"), height=height, width=width
            ).to(device, torch.float32)
        for _ in range(request.num_images):
            latents.append(retrieve_latents(vae.encode(pixels), generator=next(images)))
    scaled: torch.Tensor = (torch.cat(latents) * vae.config.scaling_factor).to(pipelines.dtype)
    # In the layout of text-to-image's noise: the VAE may answer channels-last (the CPU's
    # does), and a UNet compiled for the native size then compiles again (img2img at the
    # native size, as the face pass runs it, must replay warm_up's graphs).
    return scaled.contiguous()


def _noise_seeds(requests: Sequence[GenerationParams]) -> list[int]:
    """One Brownian-tree seed per image (DPMSolverSDEScheduler's noise), drawn from the
    image's own seed: an image does not depend on the others of its request or batch."""
    return [
        int(torch.randint(0, 2**63 - 1, (1,), generator=torch.Generator().manual_seed(seed)))
        for request in requests
        for seed in request.seeds
    ]


def _concatenated(
    encodings: Iterable[tuple[torch.Tensor | None, ...]],
) -> list[torch.Tensor | None]:
    """encode_prompt's tuples of several requests, concatenated field by field (None stays)."""
    fields = list(zip(*encodings, strict=True))
    return [None if parts[0] is None else torch.cat(parts) for parts in fields]


def warm_up(pipelines: Pipelines) -> None:
    """Compile the UNets and capture their CUDA graphs for one image of the model's native
    size (1024² for SDXL), so that the first request does not pay for it.

    Does nothing for pipelines loaded without compile_unets. Afterwards other shapes and
    batch sizes replay CUDA graphs of the eager UNets, captured on their first request
    (graphs.UNetGraphs), or run eagerly where there are none (CPU, cuda_graphs off).
    """
    if not pipelines.compiled or pipelines.warmed_up:
        return
    size = native_side(pipelines)
    # CUDA graph trees record a shape on its second or third call: 20 steps give the Base
    # 16 calls and the Refiner 4.
    with pipelines.recording_compiled_shapes():
        generate(pipelines, prompt="warm-up", height=size, width=size, steps=20, seed=0)
    pipelines.warmed_up = True


def native_side(pipelines: Pipelines) -> int:
    """The side of the Base's native square image: 1024 for SDXL, 64 for the tiny model."""
    base = pipelines.base
    side: int = base.unet.config.sample_size * base.vae_scale_factor
    return side


def check_inputs(pipelines: Pipelines, requests: Sequence[GenerationParams]) -> None:
    """Every reason the requests cannot render together, as one EngineError, before
    anything changes (as diffusers' pipelines' check_inputs): each request's problems(),
    then what the engine needs beyond a valid request."""
    if not requests:
        raise EngineError("at least one job is needed")
    problems: dict[str, str] = {}
    for request in requests:
        problems = {**request.problems(), **problems}
    shared = requests[0]
    multiple = pipelines.base.vae_scale_factor
    problems.update(inpaint.check(pipelines, requests))
    if any(side < multiple or side % multiple for side in shared.canvas_size):
        problems["height and width"] = f"must be positive multiples of {multiple}"
    if any(request.seed is None for request in requests):
        problems["seed"] = "is needed (GenerationParams.filled draws one)"
    if any(request.init_image is not None and request.strength is None for request in requests):
        problems["img2img"] = "needs a strength (GenerationParams.filled gives the default)"
    if any(request.batch_key() != shared.batch_key() for request in requests):
        problems["batch"] = "requests must share their batch_key to render together"
    if problems:
        raise EngineError(problems_text(problems))


def _step_reporter(
    steps: int, on_step: Callable[[int, int], None] | None
) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    """A diffusers step-end callback counting the steps of both pipelines together (of
    the Base alone when the Refiner does not run: then it runs all `steps`)."""
    done = 0

    def report(
        _pipeline: Any, _step_index: int, _timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(done, steps)
        return callback_kwargs

    return report


def decode_latents(pipelines: Pipelines, latents: torch.Tensor) -> list[PIL.Image.Image]:
    """Decode with the float32 VAE.

    The pipelines' own decoding casts the VAE to the latents' dtype or upcasts a half
    precision VAE on every call; ours is float32 for good (load_pipelines), so the
    latents are cast to it instead.
    """
    vae = pipelines.base.vae
    decoded = vae.decode(latents.to(torch.float32) / vae.config.scaling_factor, return_dict=False)[
        0
    ]
    images: list[PIL.Image.Image] = pipelines.base.image_processor.postprocess(
        decoded, output_type="pil"
    )
    return images
