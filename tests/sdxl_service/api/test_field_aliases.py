"""The table of other tools' names (sdxl_service.api.field_aliases): each maps to a real
field, docs/api.md shows all of it, and the close-match fallback."""

from pathlib import Path

import pytest
from rest_framework import serializers

from sdxl_service.api import field_aliases
from sdxl_service.api.common import unknown_fields
from sdxl_service.api.field_aliases import ALIASES, field_meant, shown, unknown_field_message
from tests.sdxl_service.api.test_unknown_fields import ENDPOINTS

DOCS = Path(__file__).resolve().parents[3] / "docs" / "api.md"


@pytest.mark.parametrize(
    ("alias", "context", "ours"),
    [(alias, context, ours) for alias in ALIASES for context, ours in alias.ours.items()],
    ids=lambda value: getattr(value, "name", str(value)),
)
def test_each_mapping_names_a_field_of_an_endpoint_of_its_context(alias, context, ours):
    fields = [set(serializer().fields) for _, serializer, _, _ in ENDPOINTS[context]]
    assert any(ours in each for each in fields), (alias.name, context, ours)
    # A name the endpoint takes itself is never unknown there: such a mapping would be dead.
    assert any(alias.name not in each for each in fields)


def test_every_name_of_the_table_is_in_the_docs_table():
    section = DOCS.read_text(encoding="utf-8").split("### Unknown fields and names", 1)[1]
    table = section.split("\n## ", 1)[0]
    for alias in ALIASES:
        assert f"| `{alias.name}` |" in table, alias.name
        for ours in alias.ours.values():
            assert f"`{ours}`" in table


def test_the_tools_names_are_checked_against_their_sources():
    # Names read in A1111's /sdapi/v1/txt2img, ComfyUI's KSampler and LoraLoader,
    # cog-sdxl's predict.py, kohya's train_network.py (docs/api.md cites them).
    by_tool = {
        field_aliases.A1111: {"cfg_scale", "sampler_name", "n_iter", "denoising_strength"},
        field_aliases.COMFY: {"cfg", "denoise", "ckpt_name", "lora_name", "strength_model"},
        field_aliases.DIFFUSERS: {"num_inference_steps", "num_images_per_prompt", "generator"},
        field_aliases.COG: {"num_outputs", "refine", "high_noise_frac", "prompt_strength"},
        field_aliases.KOHYA: {"max_train_steps", "network_dim", "network_alpha", "unet_lr"},
    }
    for tool, names in by_tool.items():
        listed = {alias.name for alias in ALIASES if tool in alias.tools}
        assert names <= listed, (tool, names - listed)


def test_a_serializer_without_a_context_gets_every_mapping_to_its_fields():
    """A new endpoint's serializer (a caption edit) gets the hints without naming a
    context."""

    class CaptionEdit(serializers.Serializer):
        caption = serializers.CharField()

    assert unknown_fields(CaptionEdit(), {"prompt": "x", "caption": "y"}) == {
        "prompt": ['unknown field; did you mean "caption"?']
    }


@pytest.mark.parametrize(
    ("name", "fields", "context", "message"),
    [
        ("promt", ["prompt", "steps"], None, 'unknown field; did you mean "prompt"?'),
        ("max_steps", ["steps", "epochs"], None, 'unknown field; did you mean "steps"?'),
        ("zzz", ["prompt"], None, "unknown field"),
        # Mapped only where the context has the field: steps is /txt2img's too.
        (
            "max_train_steps",
            ["steps", "prompt"],
            field_aliases.GENERATION,
            "unknown field",
        ),
        (
            "restore_faces",
            ["prompt"],
            field_aliases.GENERATION,
            "unknown field (this service has no face restoration)",
        ),
    ],
)
def test_unknown_field_message(name, fields, context, message):
    assert unknown_field_message(name, fields, context) == message


def test_field_meant_prefers_the_table_to_a_close_spelling():
    assert field_meant("batch_size", ["num_images", "batch_sizes"], field_aliases.GENERATION) == (
        "num_images",
        "",
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cfg_scale", "cfg_scale"),
        ("", '""'),
        (".", '"."'),
        ("non_field_errors", '"non_field_errors"'),
    ],
)
def test_shown_names_stay_names_in_a_message(name, expected):
    assert shown(name) == expected
