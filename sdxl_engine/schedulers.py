"""The samplers a generation may ask for by name, as AUTOMATIC1111, ComfyUI and cog-sdxl
offer them, and the diffusers scheduler each one is.

The mapping follows diffusers' table of A1111/k-diffusion equivalents (docs, "Schedulers"
overview), except DPM++ SDE Karras: the table names DPMSolverSinglestepScheduler, a
deterministic solver, while A1111's sampler is k-diffusion's sample_dpmpp_sde, stochastic
with Brownian-tree noise, which diffusers ported as DPMSolverSDEScheduler (needs torchsde).

Importing this module does not import torch or diffusers: the web process validates a
request's name against SCHEDULER_NAMES (parameters.GenerationParams.problems);
build_scheduler imports diffusers when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SchedulerSpec:
    diffusers_class: str  # a scheduler class of the diffusers package
    options: dict[str, Any] = field(default_factory=dict)  # given to from_config
    a1111_name: str = ""  # the sampler's name in AUTOMATIC1111 (and its PNG infotext)


SCHEDULERS: dict[str, SchedulerSpec] = {
    "euler": SchedulerSpec("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp_2m": SchedulerSpec("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpmpp_2m_karras": SchedulerSpec(
        "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"
    ),
    "dpmpp_sde_karras": SchedulerSpec(
        "DPMSolverSDEScheduler", {"use_karras_sigmas": True}, "DPM++ SDE Karras"
    ),
    "ddim": SchedulerSpec("DDIMScheduler", {}, "DDIM"),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", {}, "UniPC"),
}
SCHEDULER_NAMES = tuple(SCHEDULERS)


def build_scheduler(name: str, config: Any, noise_seeds: list[int] | None = None) -> Any:
    """A fresh scheduler `name` from `config` (the pipeline's loaded scheduler config, so
    the model's own timestep and beta settings stay), with `name`'s options.

    DPMSolverSDEScheduler draws its step noise from Brownian trees seeded by
    noise_sampler_seed, not from the pipeline's `generator`: `noise_seeds` (one per image
    of the batch) make it reproducible. The other schedulers ignore them.
    """
    import diffusers

    spec = SCHEDULERS[name]  # a name GenerationParams.problems() let through
    options = dict(spec.options)
    if spec.diffusers_class == "DPMSolverSDEScheduler":
        options["noise_sampler_seed"] = noise_seeds
    return getattr(diffusers, spec.diffusers_class).from_config(config, **options)
