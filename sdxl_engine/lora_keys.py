"""The one table of LoRA key spellings, and the one reader of each module's LoRA scale.

A LoRA file names each module's factors in one of these forms:

- diffusers (what the service stores): `unet.<module>.lora.down.weight` / `.lora.up.weight`,
  and for the text encoders `text_encoder[_2].<module>.lora_linear_layer.down.weight` /
  `.up.weight`;
- PEFT: `<component>.<module>.lora_A.weight` / `.lora_B.weight`, or without the component
  for one model's adapter (PEFT's `get_peft_model_state_dict`, diffusers'
  `save_lora_adapter`), or behind `base_model.model.` (PEFT's `save_pretrained`);
- kohya (sd-scripts, and LyCORIS' LoCon): `lora_unet_` / `lora_te1_` / `lora_te2_` /
  `lora_te_` and the module path with underscores for dots, then `.lora_down.weight` /
  `.lora_up.weight` / `.alpha`. sd-scripts trains SDXL on its own copy of the original (SGM)
  UNet, so its UNet keys name that layout (`input_blocks_4_1_...`, `middle_block_...`,
  `output_blocks_...`, resnets' `in_layers_2`/`out_layers_3`/`emb_layers_1`/
  `skip_connection`, `time_embed_0`, `label_emb_0_0`, `out_2`); kohya_module_path maps
  both layouts onto diffusers' module paths.

A module's factors are down (rank x in) and up (out x rank) for a Linear module; for a
Conv2d one (LoCon) down (rank x in x kh x kw) and up (out x rank x 1 x 1).

A module's LoRA adds `alpha / rank * up @ down` to its weight (`alpha / sqrt(rank)` with
rsLoRA). alpha comes from a kohya-style `.alpha` tensor, or from the PEFT adapter config
diffusers keeps in the header, or, with neither, equals the rank (scale 1), as diffusers
assumes. Reading tensors needs torch, so callers pass the alpha tensors' values in.

Neither torch nor diffusers is imported here: the web process checks uploads with this table.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from sdxl_engine.errors import EngineError

UNET = "unet"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = (UNET, *TEXT_ENCODERS)

# The forms a key may be spelt in (see the module docstring).
DIFFUSERS = "diffusers"
PEFT = "peft"
PEFT_MODEL = "peft_model"  # PEFT behind `base_model.model.`
KOHYA = "kohya"

# The factors of a module's LoRA: down (rank x in), up (out x rank) and its alpha.
DOWN = "down"
UP = "up"
ALPHA = "alpha"

_DIFFUSERS_UNET_SUFFIXES = {DOWN: ".lora.down.weight", UP: ".lora.up.weight"}
_DIFFUSERS_TEXT_ENCODER_SUFFIXES = {
    DOWN: ".lora_linear_layer.down.weight",
    UP: ".lora_linear_layer.up.weight",
}
# Keys without a component are one model's adapter, which conversion reads as the UNet's
# (sdxl_engine.lora_formats): they take the UNet's spelling.
DIFFUSERS_SUFFIXES: dict[str | None, dict[str, str]] = {
    None: _DIFFUSERS_UNET_SUFFIXES,
    UNET: _DIFFUSERS_UNET_SUFFIXES,
    **{component: _DIFFUSERS_TEXT_ENCODER_SUFFIXES for component in TEXT_ENCODERS},
}
PEFT_SUFFIXES = {DOWN: ".lora_A.weight", UP: ".lora_B.weight"}
KOHYA_SUFFIXES = {DOWN: ".lora_down.weight", UP: ".lora_up.weight", ALPHA: ".alpha"}
# diffusers spells the alphas it reads from kohya files (its "network alphas") this way.
ALPHA_SUFFIX = KOHYA_SUFFIXES[ALPHA]
# sd-scripts' prefixes; `lora_te_` is the one text encoder of SD 1.x files.
KOHYA_PREFIXES = {
    "lora_unet_": UNET,
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te_": "text_encoder",
}
PEFT_MODEL_PREFIX = "base_model.model."

# The projections LoRA training targets (sdxl_engine.training uses this list).
TARGET_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_TARGET_MODULE = re.compile(
    r"[\w.]+\.(?:" + "|".join(re.escape(name) for name in TARGET_PROJECTIONS) + ")"
)

# diffusers keeps the PEFT adapter config of each component in this header entry, its
# fields prefixed with the component (`unet.lora_alpha`); PEFT and diffusers'
# `save_lora_adapter` write one model's config there unprefixed (`lora_alpha`).
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class LoraKey:
    """One tensor key of a LoRA file, split into what it names."""

    form: str  # DIFFUSERS, PEFT, PEFT_MODEL or KOHYA
    component: str | None  # None: a single model's adapter, keyed without a component
    module: str  # the module path; in kohya's form, with underscores for dots
    factor: str  # DOWN, UP or ALPHA

    @property
    def module_id(self) -> tuple[str | None, str]:
        """What the down, up and alpha keys of one module have in common."""
        return self.component, self.module

    @property
    def is_unet_factor(self) -> bool:
        """A down or up weight of a UNet module in diffusers' or PEFT's spelling under
        `unet.`: what the service stores, checks and merges into the UNet."""
        return self.component == UNET and self.factor != ALPHA and self.form in (DIFFUSERS, PEFT)

    def in_form(self, form: str) -> str:
        """This down or up key spelt in diffusers' form (DIFFUSERS) or PEFT's (PEFT)."""
        suffixes = DIFFUSERS_SUFFIXES[self.component] if form == DIFFUSERS else PEFT_SUFFIXES
        head = f"{self.component}." if self.component else ""
        return head + self.module + suffixes[self.factor]


def component_of(key: str) -> str | None:
    """The component a (non-kohya) key starts with, or None for one model's adapter."""
    first = key.split(".", 1)[0]
    return first if first in COMPONENTS else None


def split_lora_key(key: str) -> LoraKey | None:
    """What `key` names, or None when it is no LoRA factor in a form above (diffusers'
    older attention-processor keys, DoRA magnitudes, LoHa factors, biases...)."""
    for prefix, kohya_component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            return _split_suffix(key, KOHYA, kohya_component, len(prefix), KOHYA_SUFFIXES)
    form = PEFT_MODEL if key.startswith(PEFT_MODEL_PREFIX) else None
    rest = key.removeprefix(PEFT_MODEL_PREFIX)
    component = component_of(rest)
    start = len(key) - len(rest) + (len(component) + 1 if component else 0)
    if rest.endswith(ALPHA_SUFFIX):
        return _split_suffix(key, form or DIFFUSERS, component, start, {ALPHA: ALPHA_SUFFIX})
    peft = _split_suffix(key, form or PEFT, component, start, PEFT_SUFFIXES)
    if peft is not None or form is not None:
        return peft
    return _split_suffix(key, DIFFUSERS, component, start, DIFFUSERS_SUFFIXES[component])


def _split_suffix(
    key: str, form: str, component: str | None, start: int, suffixes: Mapping[str, str]
) -> LoraKey | None:
    for factor, suffix in suffixes.items():
        if key.endswith(suffix) and len(key) - len(suffix) > start:
            return LoraKey(form, component, key[start : -len(suffix)], factor)
    return None


def factor_of(key: str) -> str | None:
    """DOWN, UP or ALPHA for a LoRA factor's key in any form; None for any other key."""
    lora_key = split_lora_key(key)
    return lora_key.factor if lora_key is not None else None


# What LyCORIS and PEFT write for the kinds of adapter that are no plain LoRA/LoCon, by a
# trailing part of the key (after the module name): each kind, named in refusals.
_UNSUPPORTED_KINDS = (
    (re.compile(r"\.hada_(w[12]_[ab]|t[12])$"), "LoHa"),
    (re.compile(r"\.lokr_(w[12](_[ab])?|t[12])$"), "LoKr"),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector(\.weight)?)$"), "DoRA"),
    (re.compile(r"\.(on_input|ia3_l|ia3_l\.weight)$"), "(IA)3"),
    (re.compile(r"\.(a1|a2|b1|b2|bm)\.weight$"), "GLoRA"),
    (re.compile(r"\.(oft_blocks|oft_R\.weight|oft_diag|rescale|boft_R)$"), "OFT/BOFT"),
    (re.compile(r"\.(diff|diff_b)$"), "A full weight difference (LyCORIS 'full')"),
    (re.compile(r"\.(w_norm|b_norm)$"), "Norm-layer training"),
    (re.compile(r"\.lora_mid\.weight$"), "Tucker-decomposed LoCon (lora_mid)"),
    (re.compile(r"\.scalar$"), "LyCORIS' use_scalar"),
    (re.compile(r"\.(lora_embedding_[AB])$"), "An embedding-layer LoRA"),
    (re.compile(r"(\.lora_(A|B|up|down)|\.lora(_linear_layer)?\.(up|down))\.bias$"), "LoRA bias"),
)


def unsupported_kind(key: str) -> str | None:
    """The kind of adapter a key that is no LoRA/LoCon factor belongs to ("LoHa", "LoKr",
    "DoRA"...), or None when it is no key of a kind we know."""
    for pattern, kind in _UNSUPPORTED_KINDS:
        if pattern.search(key):
            return kind
    if key.startswith(tuple(KOHYA_PREFIXES)) and key.endswith(".weight") and "." not in key[:-7]:
        return "(IA)3"  # LyCORIS' IA3 keeps one `.weight` per module, beside `.on_input`
    return None


def unsupported_message(key: str) -> str:
    """Why `key` (no LoRA factor in any form) is refused."""
    kind = unsupported_kind(key)
    if kind is None:
        return f"{key!r} is no LoRA/LoCon down, up or alpha weight"
    return f"{kind} is not supported ({key}); upload a plain LoRA or LoCon"


# Module names with underscores in them: kohya's form writes every dot as an underscore,
# so these are joined back whole (the UNet's and the CLIP text encoders' Linear and Conv2d
# modules, and the containers above them).
_COMPOUND_NAMES = tuple(
    tuple(name.split("_"))
    for name in (
        # diffusers' UNet2DConditionModel
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "proj_in",
        "proj_out",
        "conv_in",
        "conv_out",
        "conv_shortcut",
        "time_emb_proj",
        "time_embedding",
        "add_embedding",
        "linear_1",
        "linear_2",
        # transformers' CLIPTextModel / CLIPTextModelWithProjection
        "text_model",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "text_projection",
    )
)


def dotted_module_path(underscored: str) -> str:
    """A module path of diffusers' UNet or a CLIP text encoder from its kohya spelling
    (`down_blocks_1_attentions_0_proj_in` -> `down_blocks.1.attentions.0.proj_in`)."""
    tokens = underscored.split("_")
    parts, i = [], 0
    while i < len(tokens):
        for compound in sorted(_COMPOUND_NAMES, key=len, reverse=True):
            if tuple(tokens[i : i + len(compound)]) == compound:
                parts.append("_".join(compound))
                i += len(compound)
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def kohya_module_name(module: str) -> str:
    """A diffusers module path in kohya's spelling: dots as underscores."""
    return module.replace(".", "_")


# sd-scripts' SDXL UNet (library/sdxl_original_unet.py) names, outside the blocks...
_SGM_TOP = {
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "label_emb_0_0": "add_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
}
# ... and inside a ResnetBlock2D (the Sequentials' Conv2d and Linear members).
_SGM_RESNET = {
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_SGM_BLOCK = re.compile(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(\w+)")
_SGM_MIDDLE_BLOCK = re.compile(r"middle_block_(\d+)_(\w+)")
_SGM_MIDDLE = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}


def is_sgm_module(kohya_module: str) -> bool:
    """Whether a kohya UNet module name uses the original (SGM) UNet's layout."""
    return kohya_module in _SGM_TOP or kohya_module.startswith(
        ("input_blocks_", "middle_block_", "output_blocks_")
    )


def kohya_module_path(
    component: str | None, kohya_module: str, layers_per_block: int | None
) -> str:
    """The diffusers module path a kohya key's module name (after its `lora_unet_` /
    `lora_te1_` / `lora_te2_` prefix) denotes in its component.

    UNet names in sd-scripts' SGM layout need the UNet's `layers_per_block` (2 for SDXL):
    its blocks are numbered through, `input_blocks.{1 + level * (layers + 1) + layer}`.
    Raises EngineError for a name in that layout that names no Linear or Conv2d module.
    Whether the module exists in the model is checked against its shapes (lora_files).
    """
    if component != UNET or not is_sgm_module(kohya_module):
        return dotted_module_path(kohya_module)
    if kohya_module in _SGM_TOP:
        return _SGM_TOP[kohya_module]
    unknown = EngineError(
        f"lora_{component}_{kohya_module} names no Linear or Conv2d module of SDXL's UNet "
        "(sd-scripts' input_blocks/middle_block/output_blocks layout)"
    )
    middle = _SGM_MIDDLE_BLOCK.fullmatch(kohya_module)
    if middle is not None:
        if int(middle[1]) not in _SGM_MIDDLE:
            raise unknown
        return _sgm_inner(f"mid_block.{_SGM_MIDDLE[int(middle[1])]}", middle[2], unknown)
    match = _SGM_BLOCK.fullmatch(kohya_module)
    if match is None:
        raise unknown
    kind, number, inner, rest = match[1], int(match[2]), int(match[3]), match[4]
    if not isinstance(layers_per_block, int) or isinstance(layers_per_block, bool):
        raise EngineError(
            f"lora_{component}_{kohya_module} uses sd-scripts' SDXL block numbers, which this "
            "model's UNet (layers per block differing between blocks) has no counterpart of"
        )
    per_level = layers_per_block + 1
    if kind == "input_blocks":
        if number < 1:
            raise unknown
        level, layer = divmod(number - 1, per_level)
        if layer == layers_per_block:  # the level's last entry is its Downsample2D
            if (inner, rest) != (0, "op"):
                raise unknown
            return f"down_blocks.{level}.downsamplers.0.conv"
        if inner not in (0, 1):
            raise unknown
        blocks = "resnets" if inner == 0 else "attentions"
        return _sgm_inner(f"down_blocks.{level}.{blocks}.{layer}", rest, unknown)
    level, layer = divmod(number, per_level)
    if rest == "conv" and inner in (1, 2) and layer == layers_per_block:
        return f"up_blocks.{level}.upsamplers.0.conv"  # Upsample2D after the level's last
    if inner not in (0, 1):
        raise unknown
    blocks = "resnets" if inner == 0 else "attentions"
    return _sgm_inner(f"up_blocks.{level}.{blocks}.{layer}", rest, unknown)


def _sgm_inner(head: str, rest: str, unknown: EngineError) -> str:
    if ".resnets." in head:
        if rest not in _SGM_RESNET:
            raise unknown
        return f"{head}.{_SGM_RESNET[rest]}"
    # A SpatialTransformer's members are named as diffusers' Transformer2DModel's.
    return f"{head}.{dotted_module_path(rest)}"


# The CLIP text encoders' members that transformers 4 (which community files were written
# with) keeps under `text_model.`; transformers 5 builds CLIPTextModel without that wrapper
# (CLIPTextModelWithProjection keeps it).
_TEXT_MODEL = "text_model."
_TEXT_MODEL_MEMBERS = ("embeddings.", "encoder.", "final_layer_norm")


def community_module_path(component: str | None, module: str) -> str:
    """A module path as files made by other tools spell it: a CLIP text encoder's layers
    under `text_model.` (`text_model.encoder.layers.0.mlp.fc1`)."""
    if component in TEXT_ENCODERS and module.startswith(_TEXT_MODEL_MEMBERS):
        return _TEXT_MODEL + module
    return module


def installed_module_path(component: str | None, module: str) -> str:
    """A module path as the installed transformers names the module in the model (what the
    service stores, and what named_modules() gives), from either spelling."""
    if component not in TEXT_ENCODERS:
        return module
    if component == TEXT_ENCODERS[0] and not _clip_text_model_has_wrapper():
        return module.removeprefix(_TEXT_MODEL)
    return community_module_path(component, module)


@functools.cache
def _clip_text_model_has_wrapper() -> bool:
    from importlib.metadata import version

    return int(version("transformers").split(".")[0]) < 5


def is_target_projection(module: str) -> bool:
    """Whether the module path ends in an attention projection LoRA training targets."""
    return _TARGET_MODULE.fullmatch(module) is not None


@dataclass(frozen=True)
class _AdapterConfig:
    """The fields of a PEFT LoraConfig that set a module's scale."""

    lora_alpha: float | None
    alpha_pattern: tuple[tuple[re.Pattern[str], float], ...]
    has_rank_pattern: bool
    use_rslora: bool

    def alpha(self, module: str, rank: int) -> float:
        """The module's alpha the way PEFT picks it (peft.utils.other.get_pattern_key): the
        first pattern that matches the end of the module path, whole dotted names only."""
        for pattern, alpha in self.alpha_pattern:
            if pattern.match(module):
                return alpha
        return self.lora_alpha if self.lora_alpha is not None else float(rank)


@dataclass(frozen=True)
class LoraScales:
    """The scale (alpha / rank) of each module of one LoRA file: see lora_scales."""

    alphas: Mapping[tuple[str | None, str], float]
    configs: Mapping[str | None, _AdapterConfig]  # by component; None: unprefixed

    @property
    def has_module_patterns(self) -> bool:
        """Whether an adapter config sets alphas or ranks per module (alpha_pattern,
        rank_pattern)."""
        return any(
            config.alpha_pattern or config.has_rank_pattern for config in self.configs.values()
        )

    def scale(self, component: str | None, module: str, rank: int) -> float:
        """The factor `up @ down` of the module is multiplied by; `rank` is its down-weight's
        first dimension."""
        alpha = self.alphas.get((component, module))
        if alpha is not None:
            return alpha / rank
        config = self.configs.get(component) or self.configs.get(None)
        if config is None:
            return 1.0
        return config.alpha(module, rank) / (math.sqrt(rank) if config.use_rslora else rank)


def lora_scales(
    metadata: Mapping[str, str], alphas: Mapping[tuple[str | None, str], float] | None = None
) -> LoraScales:
    """Each module's scale in a LoRA file, from wherever the file keeps its alphas.

    `metadata` is the file's header metadata; `alphas` maps the module_id of each `.alpha`
    tensor to its value (kohya's form, and diffusers' spelling of it). A module's own alpha
    tensor wins; then its component's adapter config (`unet.lora_alpha`, `unet.r`,
    `unet.alpha_pattern`, `unet.use_rslora`...); then an unprefixed config (`lora_alpha`...),
    a single model's, which applies to every module; with none, alpha is the rank.

    Raises EngineError for a config that is not one, or one that uses DoRA: a DoRA module's
    effect is no scaled `up @ down`.
    """
    raw = metadata.get(ADAPTER_METADATA_KEY)
    try:
        config = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):  # not JSON, a 4,300-digit number, or nested too deep
        raise EngineError(f"the header's {ADAPTER_METADATA_KEY} is not JSON it can read") from None
    if not isinstance(config, dict):
        raise _not_a_config("it is not a JSON object")
    fields: dict[str | None, dict[str, object]] = {}
    for key, value in config.items():
        component = component_of(key)
        name = key.removeprefix(f"{component}.") if component else key
        fields.setdefault(component, {})[name] = value
    return LoraScales(
        alphas=dict(alphas or {}),
        configs={component: _adapter_config(component, own) for component, own in fields.items()},
    )


def _adapter_config(component: str | None, fields: dict[str, object]) -> _AdapterConfig:
    if fields.get("use_dora"):
        raise EngineError(
            f"LoRA uses DoRA for its {component or 'model'}, which this service cannot apply; "
            "upload a plain LoRA"
        )
    alpha_pattern = fields.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict):
        raise _not_a_config("its alpha_pattern is not a map")
    try:
        patterns = tuple(
            (re.compile(rf"(.*\.)?({pattern})$"), _number(alpha, f"alpha_pattern[{pattern!r}]"))
            for pattern, alpha in alpha_pattern.items()
        )
    except re.error as error:
        raise _not_a_config(f"its alpha_pattern holds an invalid pattern ({error})") from error
    alpha = fields.get("lora_alpha")
    return _AdapterConfig(
        lora_alpha=None if alpha is None else _number(alpha, "lora_alpha"),
        alpha_pattern=patterns,
        has_rank_pattern=bool(fields.get("rank_pattern")),
        use_rslora=bool(fields.get("use_rslora")),
    )


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _not_a_config(f"its {name} is not a number")
    return float(value)


def _not_a_config(detail: str) -> EngineError:
    return EngineError(f"the header's {ADAPTER_METADATA_KEY} is no LoRA adapter config: {detail}")
