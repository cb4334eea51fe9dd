"""CUDA graphs of the eager UNets, one per input shape, for the shapes nothing compiled.

At batch 1 an eager SDXL UNet step spends more time launching its ~2,000 kernels from
Python than the GPU spends running them. torch.compile's CUDA graphs remove that for the
shape it compiled (the native 1024², `generation.warm_up`), but compiling another shape
takes minutes, and one graph for every shape (dynamic shapes) did not finish compiling in
8.5 minutes on an H200 (docs/benchmarks.md). Capturing the *eager* kernels of one UNet
call in a CUDA graph costs about a second instead (0.6-1.6 s more for the first request of
a shape, both UNets, on an H200), so every other image size and batch gets its launches
replayed from a graph from its first request on.

A LoRA merged in place (merge.LoraMerger) reaches the graphs: they read the
weights' memory, which the merge overwrites. PEFT-layered LoRAs change the modules, so
generation turns the graphs off while one is loaded (`UNetGraphs.paused`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

logger = logging.getLogger(__name__)

# What a graph is captured for: the names of the added conditioning, then each input's
# shape and dtype (sample, timestep, encoder_hidden_states, the added conditioning).
_InputsKey = tuple[tuple[str, ...], *tuple[tuple[tuple[int, ...], torch.dtype], ...]]

# Calls run eagerly on a side stream before a capture: cuBLAS and cuDNN set up their
# handles and workspaces on first use, which must not happen inside a capture.
_WARMUP_CALLS = 2


class _Graph:
    """One captured UNet call: inputs are copied into its static tensors, then replayed."""

    def __init__(
        self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], output: torch.Tensor
    ) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output

    def replay(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        for static, tensor in zip(self.inputs, tensors, strict=True):
            static.copy_(tensor)
        self.graph.replay()
        # Every graph shares one memory pool: the next replay may reuse this output's memory.
        return self.output.clone()


class UNetGraphs:
    """Calls of `unet` (a diffusers UNet2DConditionModel) replayed from CUDA graphs, one
    captured per distinct set of input shapes on its first call.

    `install` puts it in front of the UNet's call (and of its torch.compile'd call, if
    any): shapes in `compiled_shapes` go to the compiled code, all others to the graphs.
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.graphs: dict[_InputsKey, _Graph] = {}
        self.compiled_shapes: set[_InputsKey] = set()
        self.uncapturable: set[_InputsKey] = set()
        self._compiled_call: Callable[..., Any] | None = None
        self._recording_compiled = False
        # One pool for every graph: they replay one at a time, on one stream.
        self._pool = torch.cuda.graph_pool_handle()

    def install(self) -> None:
        self._compiled_call = self.unet._compiled_call_impl
        self.unet._compiled_call_impl = self

    @contextlib.contextmanager
    def recording_compiled_shapes(self) -> Iterator[None]:
        """Within the block every call goes to the compiled code, and its shapes are
        remembered as compiled (generation.warm_up)."""
        self._recording_compiled = True
        try:
            yield
        finally:
            self._recording_compiled = False

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        **kwargs: Any,
    ) -> Any:
        if not _capturable(sample, timestep, encoder_hidden_states, kwargs):
            return self._plain_call(sample, timestep, encoder_hidden_states, **kwargs)
        added = kwargs.get("added_cond_kwargs") or {}
        added_keys = tuple(sorted(added))
        tensors = [sample, timestep, encoder_hidden_states, *(added[k] for k in added_keys)]
        key: _InputsKey = (added_keys, *((tuple(t.shape), t.dtype) for t in tensors))
        if self._compiled_call is not None:
            if self._recording_compiled:
                self.compiled_shapes.add(key)
            if key in self.compiled_shapes:
                return self._compiled_call(sample, timestep, encoder_hidden_states, **kwargs)
        if key in self.uncapturable:
            return self._plain_call(sample, timestep, encoder_hidden_states, **kwargs)
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = self.graphs[key] = self._capture(tensors, added_keys)
            except RuntimeError:
                # A request is never failed for want of a graph: this shape runs as before.
                logger.exception("no CUDA graph for UNet inputs %s; running eagerly", _shapes(key))
                self.uncapturable.add(key)
                return self._plain_call(sample, timestep, encoder_hidden_states, **kwargs)
            logger.info("captured a CUDA graph of the UNet for inputs %s", _shapes(key))
        output = graph.replay(tensors)
        return (output,) if not kwargs.get("return_dict", True) else _output(output)

    def _plain_call(self, *args: Any, **kwargs: Any) -> Any:
        call = self._compiled_call if self._compiled_call is not None else self.unet._call_impl
        return call(*args, **kwargs)

    def _capture(self, tensors: list[torch.Tensor], added_keys: tuple[str, ...]) -> _Graph:
        inputs = [tensor.clone() for tensor in tensors]
        sample, timestep, hidden, *added = inputs
        added_cond_kwargs = dict(zip(added_keys, added, strict=True)) if added_keys else None

        def run() -> torch.Tensor:
            # The UNet's own forward, eager: neither the compiled code nor this object.
            output: torch.Tensor = self.unet._call_impl(
                sample, timestep, hidden, added_cond_kwargs=added_cond_kwargs, return_dict=False
            )[0]
            return output

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_CALLS):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = run()
        return _Graph(graph, inputs, output)


def _capturable(
    sample: object, timestep: object, encoder_hidden_states: object, kwargs: dict[str, Any]
) -> bool:
    """The SDXL pipelines' calls: CUDA tensors for the latents, timestep and conditioning,
    and no other argument (timestep_cond, attention masks, cross-attention or ControlNet
    arguments run as they are)."""
    added = kwargs.get("added_cond_kwargs") or {}
    tensors = [sample, timestep, encoder_hidden_states, *added.values()]
    given = {name for name, value in kwargs.items() if value is not None}
    return given <= {"added_cond_kwargs", "return_dict"} and all(
        isinstance(t, torch.Tensor) and t.is_cuda for t in tensors
    )


def _output(sample: torch.Tensor) -> UNet2DConditionOutput:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


def _shapes(key: _InputsKey) -> str:
    return ", ".join("x".join(map(str, shape)) or "scalar" for shape, _dtype in key[1:])
