"""The Profile: a declarative, frozen description of how a diffusers pipeline runs. No torch here.

A profile is data. It validates on construction (unknown keys, wrong types, bad sizes fail with one
line naming the field, the value and what would work) and is checked against a concrete pipeline and
machine by :func:`fluxtune.apply` before anything is changed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from fluxtune.errors import ProfileError
from fluxtune.knobs import (
    Attention,
    Budget,
    Cache,
    Compile,
    Component,
    Generation,
    GroupOffload,
    Knob,
    LoraSpec,
    Matmul,
    Measured,
    ModelOffload,
    Modulation,
    NoCache,
    NoOffload,
    PartialResidency,
    SequentialOffload,
    Tiling,
    Vae,
)

SCHEMA_VERSION = 1
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
"""Component sections a profile may carry (diffusers attribute names; DiT has transformer and vae)."""

CapabilityClass = Literal["ampere", "ada", "hopper", "blackwell"]
"""GPU classes by what fluxtune's knobs compute on them (:mod:`fluxtune.gpus` maps SMs to classes)."""

_SHORTHAND_KEY = {"offload": "mode", "cache": "kind", "quantize": "method"}


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in nested plain data, in place; a shorthand string on the way (``quantize: int8_weight``)
    becomes its section (``{method: int8_weight}``) so a sub-key can be set on it."""
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ProfileError(f"key {key!r} is empty; example: generation.steps")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str):
            child = {_SHORTHAND_KEY.get(part, "method"): child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


class Variant(Knob):
    """A preset's knobs for some GPU classes: dotted overrides of the base profile, and what was measured.

    Example (the base runs fp8 row-wise, which needs Hopper)::

        variants:
          - name: ada
            classes: [ada, blackwell]
            set: {transformer.quantize.granularity: tensor}
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    classes: tuple[CapabilityClass, ...] = Field(min_length=1)
    description: str = ""
    set: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value, applied to the base")
    measured: Measured | None = None


class Profile(Knob):
    """How a pipeline runs: budget, per-component placement and precision, attention, cache, compile,
    VAE and the generation call it was validated for, plus what was measured."""

    schema_version: Literal[1] = 1
    name: str = Field(default="custom", description="the profile's name (a preset's is its file name)")
    description: str = Field(default="", description="what it is for, in a line")
    family: Literal["flux", "dit", "flux2", "qwenimage", "any"] = Field(
        default="any", description="pipelines this profile targets (fluxtune.pipelines.FAMILY_PIPELINES)")
    budget: Budget = Budget()
    transformer: Component = Component()
    text_encoder: Component = Component()
    text_encoder_2: Component = Component()
    vae: Vae = Vae()
    attention: Attention = Attention()
    matmul: Matmul = Matmul()
    modulation: Modulation = Modulation()
    cache: Cache = NoCache()
    tiling: Tiling = Tiling()
    compile: Compile = Compile()
    generation: Generation = Generation()
    loras: tuple[LoraSpec, ...] = Field(default=(), description="LoRA files applied to the transformer")
    measured: Measured | None = None
    variants: tuple[Variant, ...] = Field(
        default=(), description="per GPU class overrides; apply() runs the one matching the detected GPU")
    variant: str | None = Field(default=None, description="set on a resolved profile: the variant it came from")

    @field_validator("variants")
    @classmethod
    def _distinct_classes(cls, variants: tuple[Variant, ...]) -> tuple[Variant, ...]:
        seen: dict[str, str] = {}
        for v in variants:
            for c in v.classes:
                if c in seen:
                    raise ValueError(f"class {c!r} is in variants {seen[c]!r} and {v.name!r}; give each class one variant")
                seen[c] = v.name
        return variants

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_shorthand(cls, value: Any) -> Any:
        # ``compile: regional`` / ``compile=off`` as shorthand; YAML 1.1 readers (and Python callers
        # copying such YAML) turn ``off`` into False: it is the choice name here.
        if value is False or isinstance(value, str):
            return {"mode": "off" if value is False else value}
        if isinstance(value, dict) and value.get("mode") is False:
            return {**value, "mode": "off"}
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> Profile:
        for name in COMPONENTS:
            offload = self.component(name).offload
            if isinstance(offload, PartialResidency) and name == "vae":
                raise ValueError("vae.offload.mode=partial: partial residency streams blocks that run in order "
                                 "(transformer, text encoders); for the VAE use none, model or group")
        modes = {type(self.component(n).offload) for n in COMPONENTS}
        if modes & {ModelOffload, SequentialOffload} and modes & {GroupOffload, PartialResidency}:
            raise ValueError(
                "offload: model/sequential offload (accelerate hooks) and group/partial offload (diffusers "
                "hooks) do not combine in one pipeline; pick one family for all components"
            )
        hooked = self.cache.kind != "none" or any(
            self.component(n).layerwise_casting is not None
            or isinstance(self.component(n).offload, GroupOffload | PartialResidency | SequentialOffload)
            for n in ("transformer",)
        )
        if self.compile.enabled and self.compile.fullgraph and hooked:
            raise ValueError(
                "compile.fullgraph=true cannot trace through the hooks of caches, group/partial/sequential "
                "offload or layerwise casting on the transformer: set compile.fullgraph=false or drop those knobs"
            )
        if self.compile.fuse_qkv and self.transformer.layerwise_casting is not None:
            raise ValueError("compile.fuse_qkv with transformer.layerwise_casting: fuse only unquantized weights")
        self._check_loras()
        for v in self.variants:  # every variant must make a valid profile, found at load time, not on a user's GPU
            self.for_variant(v)
        return self

    def for_variant(self, variant: Variant) -> Profile:
        """The base profile with ``variant`` applied; its ``measured`` block replaces the base's.

        Raises:
            ProfileError: the overrides do not make a valid profile (names the variant and the problem).
        """
        data = self.model_dump(mode="json", exclude={"variants"})
        for key, value in variant.set.items():
            set_dotted(data, key, value)
        # The base's measurement does not describe a variant: a variant has its own or none.
        data["measured"] = variant.measured.model_dump(mode="json") if variant.measured is not None else None
        data["variant"] = variant.name
        return validate_profile(data, source=f"variants[{variant.name}]")

    def for_class(self, capability: str | None) -> Profile:
        """The profile to run on a GPU of ``capability`` (see :mod:`fluxtune.gpus`): the first variant listing
        that class, else the base knobs. A profile without variants is returned as it is."""
        if not self.variants:
            return self
        for v in self.variants:
            if capability in v.classes:
                return self.for_variant(v)
        return validate_profile({**self.model_dump(mode="json", exclude={"variants"}), "variant": "base"},
                                source=self.name)

    def variant_table(self) -> list[tuple[str, tuple[str, ...], Profile]]:
        """(variant name, classes it runs on, resolved profile) for the base and each variant."""
        covered = {c for v in self.variants for c in v.classes}
        base_classes = tuple(c for c in ("ampere", "ada", "hopper", "blackwell") if c not in covered)
        rows: list[tuple[str, tuple[str, ...], Profile]] = [("base", base_classes, self.for_class(None))]
        rows += [(v.name, tuple(v.classes), self.for_variant(v)) for v in self.variants]
        return rows

    def _check_loras(self) -> None:
        names = [lo.adapter_name for lo in self.loras]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"loras: adapter_name={dup[0]!r} is used twice; give each LoRA its own adapter_name")
        if self.loras and self.compile.fuse_qkv:
            raise ValueError("compile.fuse_qkv=true with loras: LoRA files target the separate to_q/to_k/to_v "
                             "projections; set compile.fuse_qkv=false")
        modes = sorted({lo.mode for lo in self.loras} - {"auto"})
        if len(modes) > 1:
            raise ValueError(f"loras: modes {', '.join(modes)} are mixed; one pipeline applies all its LoRAs one way "
                             "(set the same mode, or auto, on each)")
        if modes == ["adapter"] and self.transformer.quantize is not None:
            raise ValueError(f"loras.mode=adapter with transformer.quantize.method={self.transformer.quantize.method}: "
                             "peft adapters on torchao-quantized layers are slow and drift; use mode=fuse (or auto), "
                             "or layerwise_casting instead of quantize")

    def lora_mode(self) -> tuple[str, str]:
        """How this profile's LoRAs are applied (fuse, adapter or hotswap) and why."""
        explicit = sorted({lo.mode for lo in self.loras} - {"auto"})
        if explicit:
            return explicit[0], f"mode={explicit[0]} set in the profile"
        # Quantized: fuse, compiled or not. On the H200 replica (fp8 rowwise + regional compile) a fused
        # LoRA cost +0.7 % and a hot-swap adapter +5.7 %; switching a fused LoRA re-quantizes from the
        # host copy and recompiles nothing (same shapes and tensor types), it just takes longer than a swap.
        if self.transformer.quantize is not None:
            return "fuse", (f"auto: transformer.quantize.method={self.transformer.quantize.method}, so LoRAs are "
                            "fused before quantization (no adapter cost per step; switching re-quantizes)")
        if self.compile.enabled:
            return "hotswap", f"auto: compile.mode={self.compile.mode}, so LoRAs are hot-swapped without recompiling"
        return "adapter", "auto: unquantized, uncompiled transformer, so LoRAs stay separate peft adapters"

    def component(self, name: str) -> Component:
        """The section of component ``name`` (one of COMPONENTS)."""
        if name not in COMPONENTS:
            raise ProfileError(f"component {name!r} is not one of {', '.join(COMPONENTS)}")
        return getattr(self, name)  # type: ignore[no-any-return]

    def min_compute_capability(self) -> tuple[tuple[int, int], str] | None:
        """The highest GPU architecture any knob needs, with the field that needs it."""
        best: tuple[tuple[int, int], str] | None = None
        for name in COMPONENTS:
            q = self.component(name).quantize
            need = q.min_compute_capability if q is not None else None
            if q is not None and need is not None and (best is None or need > best[0]):
                best = (need, f"{name}.quantize.method={q.method}")
        return best

    def needs_gpu(self) -> str | None:
        """The first field that only works on a GPU, or None when the profile runs on CPU."""
        for name in COMPONENTS:
            c = self.component(name)
            if not isinstance(c.offload, NoOffload):
                return f"{name}.offload.mode={c.offload.mode}"
            if c.quantize is not None and c.quantize.needs_fp8:
                return f"{name}.quantize.method={c.quantize.method}"
            if c.layerwise_casting is not None:
                # fp8 storage with upcast compute works on CPU too, but is pointless there.
                continue
        # An enforced budget is not listed: on CPU it is reported as skipped (a search there bounds host RAM).
        return None

    def to_dict(self, *, exclude_defaults: bool = False) -> dict[str, Any]:
        """A plain, YAML-safe dict (sizes as "12GB"); ``exclude_defaults`` keeps only what differs."""
        full = self.model_dump(mode="json")
        return _minimal(self, full) if exclude_defaults else full

    def replace(self, **changes: Any) -> Profile:
        """A copy with top-level sections replaced, re-validated."""
        return validate_profile({**self.model_dump(mode="json"), **_dump(changes)})


_TAGS = ("mode", "kind", "method", "schema_version")


def _minimal(model: Knob, dumped: dict[str, Any]) -> dict[str, Any]:
    # Like exclude_defaults, but a union's tag (mode/kind/method) is always kept so the YAML reloads.
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        value, default = getattr(model, name), field.get_default(call_default_factory=True)
        if isinstance(value, Knob):
            if value != default:
                out[name] = _minimal(value, dumped[name])
        elif name in _TAGS or value != default:
            out[name] = dumped[name]
    return out


def _dump(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v.model_dump(mode="json") if isinstance(v, Knob) else v for k, v in values.items()}


def _loc(loc: tuple[Any, ...]) -> str:
    # pydantic puts union tags and validator labels into the location (offload.group.level); users
    # wrote offload.level. Walk the schema and keep only what a user writes.
    parts: list[str] = []
    model: Any = Profile
    for p in loc:
        if isinstance(model, tuple):  # a union: the next part may be the member's tag
            member = _tagged(model, p)
            if member is not None:
                model = member
                continue
        if isinstance(p, str) and p.startswith("function-"):
            continue
        fields = getattr(model, "model_fields", None) or {}
        parts.append(str(p))
        model = _knob_of(fields[p].annotation) if p in fields else None
    return ".".join(parts) or "profile"


def _knob_of(annotation: Any) -> Any:
    """The Knob class (or union of them) a field holds, for walking error locations."""
    if isinstance(annotation, type) and issubclass(annotation, Knob):
        return annotation
    members = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, Knob)]
    for a in getattr(annotation, "__args__", ()):  # Annotated[Union[...], ...]
        members += [m for m in getattr(a, "__args__", ()) if isinstance(m, type) and issubclass(m, Knob)]
    return members[0] if len(members) == 1 else tuple(members) or None


def _tagged(model: Any, tag: Any) -> Any:
    for m in model if isinstance(model, tuple) else ():
        for key in ("mode", "kind", "method"):
            field = m.model_fields.get(key)
            if field is not None and field.default == tag:
                return m
    return None


def format_validation_error(error: ValidationError, source: str = "profile") -> str:
    """One line: the field, the value and what would work (the first problem; a count of the rest)."""
    first = error.errors()[0]
    loc = _loc(first.get("loc", ()))
    msg = first.get("msg", "invalid").removeprefix("Value error, ")
    inp = first.get("input")
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        text = f"{source}: unknown key {loc!r}"
        parent_model = _model_at(loc.rsplit(".", 1)[0] if "." in loc else "")
        if parent_model is not None:
            text += f"; allowed here: {', '.join(parent_model.model_fields)}"
    elif kind == "union_tag_invalid":
        text = f"{source}: {loc}={_short(inp)}: {msg}"
    elif loc == "profile":
        text = f"{source}: {msg}"
    else:
        shown = "" if isinstance(inp, dict) else f"={_short(inp)}"
        text = f"{source}: {loc}{shown}: {msg}"
    more = len(error.errors()) - 1
    return text + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _model_at(dotted: str) -> type[Knob] | None:
    model: Any = Profile
    for part in [p for p in dotted.split(".") if p]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, Knob)]
        if len(args) != 1:
            return None
        model = args[0]
    return model if isinstance(model, type) and issubclass(model, Knob) else None


def validate_profile(data: dict[str, Any] | Profile, source: str = "profile") -> Profile:
    """Build a :class:`Profile` from plain data.

    Raises:
        ProfileError: one line naming the field, the value and what would work.
    """
    if isinstance(data, Profile):
        return data
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: expected a mapping of profile sections, got {type(data).__name__}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ProfileError(
            f"{source}: schema_version={version!r} is not supported; this fluxtune reads schema_version {SCHEMA_VERSION}"
        )
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        raise ProfileError(format_validation_error(e, source)) from None


__all__ = [
    "COMPONENTS",
    "SCHEMA_VERSION",
    "Generation",
    "Profile",
    "Vae",
    "format_validation_error",
    "validate_profile",
]


# ------------------------------------------------------------------------------------- reference

_NOT_KNOBS = ("schema_version", "measured", "variants", "variant")
"""Profile fields that record or select, rather than set, how the pipeline runs."""


def knob_reference() -> list[tuple[str, str, str, str]]:
    """Every key a profile sets, from the models themselves: (dotted key, type or choices, default, what it
    does). A union (offload modes, cache kinds) lists each member as ``key=value`` and its own keys under
    ``key[tag=value].``; ``text_encoder`` and ``text_encoder_2`` take the transformer's keys (not repeated)."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[Knob], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if not prefix and name in (*_NOT_KNOBS, "text_encoder", "text_encoder_2"):
                continue
            key = f"{prefix}{name}"
            sub = _knob_of(field.annotation)
            if isinstance(sub, type):
                walk(sub, key + ("[]." if _is_sequence(field.annotation) else "."))
            elif isinstance(sub, tuple):
                tag = next(t for t in ("mode", "kind", "method") if t in sub[0].model_fields)
                for member in sub:
                    value = member.model_fields[tag].default
                    default = getattr(field.get_default(call_default_factory=True), tag, None) == value
                    rows.append((f"{key}.{tag}={value}", "", "default" if default else "", _first_line(member.__doc__)))
                    for sub_name, sub_field in member.model_fields.items():
                        if sub_name != tag:
                            rows.append((f"{key}[{tag}={value}].{sub_name}", _type_text(sub_field.annotation),
                                         _default_text(sub_field), sub_field.description or ""))
            else:
                rows.append((key, _type_text(field.annotation), _default_text(field), field.description or ""))

    walk(Profile, "")
    return rows


def _first_line(doc: str | None) -> str:
    return doc.strip().splitlines()[0] if doc else ""


def _is_sequence(annotation: Any) -> bool:
    import typing

    return typing.get_origin(annotation) in (tuple, list)


def _type_text(annotation: Any) -> str:
    import typing

    args, origin = typing.get_args(annotation), typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin is typing.Annotated:
        inner = _type_text(args[0])
        return "bytes (e.g. 12GB)" if inner.startswith("int") and any("bytes" in repr(a) for a in args[1:]) else inner
    if origin in (tuple, list):
        return f"list of {_type_text(args[0])}"
    if args:
        parts = [_type_text(a) for a in args if a is not type(None)]
        return " | ".join(parts) + (" | null" if type(None) in args else "")
    return getattr(annotation, "__name__", str(annotation))


def _default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    return str(list(value)) if isinstance(value, tuple) else str(value)
