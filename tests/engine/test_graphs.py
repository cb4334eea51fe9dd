"""sdxl_engine.generation.graphs: which UNet calls go to the compiled code, to a per-shape
graph, or run as they are.

Capturing a CUDA graph needs a GPU (bench/benchmark.py checks the captured graphs' latents
against plain diffusers there); here the capture is replaced by a recording of the eager
call, so that the routing around it runs on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from sdxl_engine.generation import graphs as graphs_module
from sdxl_engine.generation.graphs import UNetGraphs
from sdxl_engine.generation.pipelines import load_pipelines


class _EagerGraph:
    """Stands in for a captured graph: replays by calling the eager UNet."""

    def __init__(self, unet, added_keys):
        self.unet, self.added_keys, self.replays = unet, added_keys, 0

    def replay(self, tensors):
        self.replays += 1
        sample, timestep, hidden, *added = tensors
        added_cond_kwargs = dict(zip(self.added_keys, added, strict=True))
        return self.unet._call_impl(
            sample, timestep, hidden, added_cond_kwargs=added_cond_kwargs, return_dict=False
        )[0]


@pytest.fixture
def unet_graphs(pipelines, monkeypatch):
    """UNetGraphs in front of the tiny Base UNet, on the CPU, with eager 'graphs'."""
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(
        graphs_module,
        "_capturable",
        lambda sample, timestep, hidden, kwargs: (
            {name for name, value in kwargs.items() if value is not None}
            <= {"added_cond_kwargs", "return_dict"}
        ),
    )
    unet = pipelines.base.unet
    graphs = UNetGraphs(unet)
    captures = []

    def capture(tensors, added_keys):
        captures.append(tuple(tuple(t.shape) for t in tensors))
        return _EagerGraph(unet, added_keys)

    monkeypatch.setattr(graphs, "_capture", capture)
    graphs.install()
    yield graphs, captures
    unet._compiled_call_impl = None


def _inputs(unet, batch: int, height: int, width: int) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(batch * 1000 + height + width)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * (
        unet.config.addition_time_embed_dim
    )
    sample = torch.randn(batch, 4, height, width, generator=generator)
    hidden = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    added = {
        "text_embeds": torch.randn(batch, pooled, generator=generator),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
    }
    return (sample, torch.tensor(500)), {
        "encoder_hidden_states": hidden,
        "added_cond_kwargs": added,
    }


def _eager(unet, positional, keywords) -> torch.Tensor:
    return unet._call_impl(*positional, **keywords, return_dict=False)[0]


def test_each_shape_is_captured_once_and_replayed_with_the_eager_result(pipelines, unet_graphs):
    graphs, captures = unet_graphs
    unet = pipelines.base.unet
    with torch.no_grad():
        for batch, height, width in [(2, 8, 8), (2, 8, 8), (2, 10, 6), (1, 8, 8), (2, 10, 6)]:
            positional, keywords = _inputs(unet, batch, height, width)
            # What the SDXL pipelines pass besides: None for everything they do not use.
            ours = unet(*positional, **keywords, timestep_cond=None, return_dict=False)[0]
            assert torch.equal(ours, _eager(unet, positional, keywords))

    assert [shapes[0] for shapes in captures] == [(2, 4, 8, 8), (2, 4, 10, 6), (1, 4, 8, 8)]
    assert sum(graph.replays for graph in graphs.graphs.values()) == 5


def test_compiled_shapes_go_to_the_compiled_code_and_the_rest_to_graphs(pipelines, unet_graphs):
    graphs, captures = unet_graphs
    unet = pipelines.base.unet
    compiled_calls = []

    def compiled(*args, **kwargs):
        compiled_calls.append(tuple(args[0].shape))
        return unet._call_impl(*args, **kwargs)

    graphs._compiled_call = compiled
    native, other = _inputs(unet, 2, 8, 8), _inputs(unet, 2, 10, 6)
    with torch.no_grad():
        with graphs.recording_compiled_shapes():
            unet(*native[0], **native[1], return_dict=False)
        unet(*native[0], **native[1], return_dict=False)
        unet(*other[0], **other[1], return_dict=False)

    assert compiled_calls == [(2, 4, 8, 8)] * 2
    assert [shapes[0] for shapes in captures] == [(2, 4, 10, 6)]


def test_a_shape_that_cannot_be_captured_runs_eagerly_from_then_on(pipelines, unet_graphs):
    graphs, _ = unet_graphs
    unet = pipelines.base.unet
    attempts = []

    def failing_capture(tensors, added_keys):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs._capture = failing_capture
    positional, keywords = _inputs(unet, 2, 8, 8)
    with torch.no_grad():
        first = unet(*positional, **keywords, return_dict=False)[0]
        again = unet(*positional, **keywords, return_dict=False)[0]
        expected = _eager(unet, positional, keywords)

    assert torch.equal(first, expected) and torch.equal(again, expected)
    assert len(attempts) == 1 and len(graphs.uncapturable) == 1 and not graphs.graphs


def test_calls_with_arguments_a_graph_cannot_hold_run_as_they_are(pipelines):
    unet = pipelines.base.unet
    positional, keywords = _inputs(unet, 1, 8, 8)
    # CPU tensors, and a timestep_cond the SDXL pipelines never pass.
    assert not graphs_module._capturable(*positional, keywords["encoder_hidden_states"], {})
    if torch.cuda.is_available():  # pragma: no cover - CI has no GPU
        cuda = [t.cuda() for t in (*positional, keywords["encoder_hidden_states"])]
        assert graphs_module._capturable(*cuda, {"timestep_cond": None})
        assert not graphs_module._capturable(*cuda, {"timestep_cond": cuda[0]})


def test_pipelines_on_the_cpu_have_no_graphs(tiny_source):
    assert load_pipelines(tiny_source, cuda_graphs=True).unet_graphs == ()
