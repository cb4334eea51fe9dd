"""Loading the SDXL Base and Refiner pipelines a worker keeps between jobs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)

from sdxl_engine.errors import EngineError
from sdxl_engine.generation.graphs import UNetGraphs
from sdxl_engine.generation.merge import LoraMerger
from sdxl_engine.lora_keys import COMPONENTS
from sdxl_engine.source import ModelSource

Purpose = Literal["generation", "training"]
# The UNets' and text encoders' precision on CUDA, per purpose (see load_pipelines).
HALF_PRECISION: dict[str, torch.dtype] = {"generation": torch.float16, "training": torch.bfloat16}

# What a missing, partial or unreachable model raises: huggingface_hub's errors derive
# from OSError (not found, HTTP, offline) or ValueError (malformed repo id); diffusers
# raises OSError/ValueError/KeyError for folders that are not pipelines.
_LOAD_ERRORS = (OSError, ValueError, KeyError)


def forked_rng(device: str | torch.device) -> contextlib.AbstractContextManager[object]:
    """torch's global generators (the CPU's, and `device`'s on CUDA) as they are now,
    given back when the block ends: what runs inside draws without disturbing them."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])


@dataclass
class Pipelines:
    base: StableDiffusionXLPipeline
    # Shares text_encoder_2 and vae with base; None when loaded for training.
    refiner: StableDiffusionXLImg2ImgPipeline | None
    device: str
    dtype: torch.dtype  # of the UNets and text encoders; the VAE is always float32
    source: ModelSource
    # torch.compile is on: whole UNets with CUDA graphs for generation (load_pipelines),
    # the Base UNet's transformer blocks while training (training.train_lora).
    compiled: bool = False
    # The native image size's graphs are captured (generation.warm_up): other shapes then
    # run eagerly instead of stalling a request for a minutes-long compile.
    warmed_up: bool = False
    # Per-shape CUDA graphs of the eager UNets (graphs.UNetGraphs), Base first; empty
    # where they are off (CPU, training, cuda_graphs=False).
    unet_graphs: tuple[UNetGraphs, ...] = ()
    # Merges a request's LoRAs into the Base's UNet and text encoders.
    loras: LoraMerger = field(init=False)

    def __post_init__(self) -> None:
        self.loras = LoraMerger(
            {component: getattr(self.base, component) for component in COMPONENTS}
        )

    @contextlib.contextmanager
    def recording_compiled_shapes(self) -> Iterator[None]:
        """Calls within go to the compiled UNets, whose shapes keep going there after."""
        with contextlib.ExitStack() as stack:
            for graphs in self.unet_graphs:
                stack.enter_context(graphs.recording_compiled_shapes())
            yield


def load_pipelines(
    source: ModelSource,
    *,
    purpose: Purpose = "generation",
    compile_unets: bool = False,
    cuda_graphs: bool = True,
) -> Pipelines:
    """Load the SDXL pipelines from `source`, on its device, for `purpose`.

    - "generation": Base and Refiner, UNets and text encoders in float16 on CUDA, SDXL's
      own release precision. bfloat16 is as fast but keeps 3 fewer mantissa bits: on the
      full-size model one bfloat16 UNet step differs by 1.1% between two attention
      kernels, float16 by 0.14% (bench/precision.py), so a LoRA merged into float16
      weights stays within 0.14% of diffusers' unfused layers.
    - "training": the Base alone (the Refiner's 2.3 B-parameter UNet would take 4.5 GB
      that a 16 GB card needs for training), in bfloat16: it has float32's range, so the
      backward pass needs no loss scaling.
    On the CPU, which has no fast half precision, both are float32 and "generation"
    pipelines train as well. The VAE stays float32 (SDXL's overflows in float16), with
    TF32 matrix units allowed so its 10 TFLOP decode does not run on the slow path.

    `compile_unets` compiles each UNet whole with torch.compile and CUDA graphs
    (`mode="reduce-overhead"`): at batch 1 an eager SDXL step on an H100 waits on the CPU
    launching ~2,000 kernels, and one graph replay removes that (Base step 72 -> 35 ms,
    `bench/levers.py`). Compiling happens on first use, per image shape: call
    `generation.warm_up` before serving so that it is paid at worker start. Training
    compiles its own regions (training.train_lora), not these graphs.

    `cuda_graphs` (generation on CUDA): every shape the compiled code was not warmed up
    for (other sizes, batch sizes; all of them without `compile_unets`) replays a CUDA
    graph of the eager UNet, captured on its first call (0.6-1.6 s added to that request
    for both UNets on an H200; graphs.UNetGraphs) instead of launching each kernel from Python.
    """
    if purpose not in HALF_PRECISION:
        raise EngineError(f"unknown purpose {purpose!r}; use one of {', '.join(HALF_PRECISION)}")
    dtype = HALF_PRECISION[purpose] if source.device == "cuda" else torch.float32
    if source.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Offline, a hub id missing from the local cache must fail at once instead of after
    # network timeouts; huggingface_hub reads HF_HUB_OFFLINE only at import, so ask here.
    local_files_only = _env_flag("HF_HUB_OFFLINE")
    if source.preset == "tiny" and source.device == "cpu":
        # The tiny model's tensors are too small to gain from intra-op threads, and on a
        # machine whose cores are busy, threads waiting on each other make each step many
        # times slower (a 100-step default run: 6.5 min with 2 threads on a loaded 2-core
        # machine, against well under a minute with 1).
        torch.set_num_threads(1)

    try:
        base: StableDiffusionXLPipeline = StableDiffusionXLPipeline.from_pretrained(
            source.base,
            dtype={"default": dtype, "vae": torch.float32},
            local_files_only=local_files_only,
        )
    except _LOAD_ERRORS as error:
        raise EngineError(
            f"SDXL base model {source.base!r} could not be loaded ({_first_line(error)}). "
            "Download it or set SDXL_BASE_MODEL to a local diffusers folder, "
            "or SDXL_MODEL_PRESET=tiny for the built-in test model."
        ) from error

    refiner = (
        _load_refiner(source, base, dtype, local_files_only) if purpose == "generation" else None
    )
    pipelines = [base] if refiner is None else [base, refiner]
    for pipeline in pipelines:
        pipeline.to(source.device)
    if source.device == "cuda":
        # cuDNN's channels-last convolutions are faster for the Base UNet, eager and in
        # training (generation step 84 -> 72 ms, training 5.2 -> 6.9 img/s on an H200,
        # bench/levers.py); the Refiner measured no gain.
        base.unet.to(memory_format=torch.channels_last)
    if compile_unets:
        # Regional compilation in training compiles the same block code once per block
        # width and batch size; past the limit dynamo would run a shape eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for pipeline in pipelines:
        pipeline.set_progress_bar_config(disable=True)
        # Inference weights: graphs compiled now stay valid after training, which freezes
        # the UNet the same way (a change of requires_grad would force a recompile).
        pipeline.unet.requires_grad_(False)
        if compile_unets and purpose == "generation":
            pipeline.unet.compile(fullgraph=True, dynamic=False, mode="reduce-overhead")
    unet_graphs = []
    if cuda_graphs and purpose == "generation" and source.device == "cuda":
        for pipeline in pipelines:
            graphs = UNetGraphs(pipeline.unet)
            graphs.install()
            unet_graphs.append(graphs)
    return Pipelines(
        base=base,
        refiner=refiner,
        device=source.device,
        dtype=dtype,
        source=source,
        compiled=compile_unets,
        unet_graphs=tuple(unet_graphs),
    )


def _load_refiner(
    source: ModelSource, base: StableDiffusionXLPipeline, dtype: torch.dtype, local_files_only: bool
) -> StableDiffusionXLImg2ImgPipeline:
    try:
        refiner: StableDiffusionXLImg2ImgPipeline = (
            StableDiffusionXLImg2ImgPipeline.from_pretrained(
                source.refiner,
                text_encoder_2=base.text_encoder_2,
                vae=base.vae,
                dtype=dtype,
                local_files_only=local_files_only,
            )
        )
    except _LOAD_ERRORS as error:
        raise EngineError(
            f"SDXL refiner model {source.refiner!r} could not be loaded ({_first_line(error)}). "
            "Download it or set SDXL_REFINER_MODEL to a local diffusers folder, "
            "or SDXL_MODEL_PRESET=tiny for the built-in test model."
        ) from error
    return refiner


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
