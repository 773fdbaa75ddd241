"""The knobs a profile sets, as frozen pydantic models. No torch here.

Variants of one knob (offload modes, quantization methods, caches) are discriminated unions keyed by
``mode`` / ``method`` / ``kind``; a bare string is accepted as shorthand (``offload: model``,
``quantize: int8_weight``, ``cache: first_block``) so that dotted overrides stay short.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator

from fluxtune.units import format_bytes, parse_bytes


class Knob(BaseModel):
    """Base of every profile section: immutable and strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


def _bytes_in(value: Any) -> Any:
    return value if value is None else parse_bytes(value)


def _bytes_out(value: int | None) -> str | int | None:
    # Human form only when it round-trips exactly, so a saved profile reloads to the same bytes.
    if value is None:
        return None
    text = format_bytes(value)
    return text if parse_bytes(text) == value else value


ByteSize = Annotated[int, BeforeValidator(_bytes_in), PlainSerializer(_bytes_out)]
"""Bytes; accepts ``"12GB"``, ``"11.5GiB"``, ``"800MB"`` or an int; saved as ``"12GB"`` when exact."""


def _shorthand(key: str) -> Any:
    def convert(value: Any) -> Any:
        return {key: value} if isinstance(value, str) else value

    return BeforeValidator(convert)


# --------------------------------------------------------------------------------------- budget


class Budget(Knob):
    """Memory the pipeline may use.

    ``vram`` is the card: the whole process's device footprint as NVML sees it (CUDA context, allocator,
    library workspaces). The owner of a card sold as 12 GB (12 GiB) passes ``12GB`` (12e9 bytes): the
    7 % between the two covers what the driver reserves on such a card. When ``enforce``, ``apply`` caps
    PyTorch's allocator at ``vram`` less the CUDA context and workspaces measured at that moment, less a
    margin for the kernels and workspaces the first call loads, less ``display_reserve``.
    """

    vram: ByteSize | None = Field(default=None, description="the card's memory: the whole process as NVML sees it "
                                  "(12GB for a 12 GB card); None = no budget")
    enforce: bool = Field(default=True, description="cap PyTorch's allocator at the budget less the CUDA context "
                          "(false: the budget only guides the choices)")
    display_reserve: ByteSize | None = Field(
        default=None, description="memory left to a display on the same GPU (e.g. 1GB on a desktop card)")
    host_ram: ByteSize | None = Field(
        default=None,
        description="host memory the process may use: itself (about 3 GB) plus the host copies of streamed "
        "and offloaded weights; checked before fluxtune.load reads anything; None = the machine's memory less "
        "max(4 GiB, 1/8)",
    )
    expandable_segments: bool = Field(
        default=False,
        description="switch PyTorch's allocator to expandable segments (process-wide, for segments made from "
        "then on): memory freed between streamed blocks can then serve an allocation of any size, where fixed "
        "segments left FLUX.2 [dev] 2.6 GB short under a 24 GB cap; switched after placement it changed nothing on the "
        "H200, so apply now switches it before quantization and placement (not yet measured so)",
    )


# -------------------------------------------------------------------------------------- offload


class NoOffload(Knob):
    """The component stays on the GPU."""

    mode: Literal["none"] = "none"


class ModelOffload(Knob):
    """The whole component moves to the GPU when it runs and back to the host after (accelerate hook)."""

    mode: Literal["model"] = "model"


class SequentialOffload(Knob):
    """Every leaf module moves to the GPU for its own forward only. Slowest, smallest."""

    mode: Literal["sequential"] = "sequential"


class GroupOffload(Knob):
    """diffusers group offloading: groups of blocks (``block``) or single layers (``leaf``) are streamed."""

    mode: Literal["group"] = "group"
    level: Literal["block", "leaf"] = Field(default="leaf", description="block: groups of repeated blocks; leaf: "
                                            "each layer on its own")
    blocks_per_group: int = Field(default=1, ge=1, description="blocks a group holds (level=block)")
    use_stream: bool = Field(default=True, description="copy the next group on a side stream during this one's compute")
    record_stream: bool = Field(default=False, description="record the copies on the compute stream instead of "
                                "synchronising (needs use_stream)")
    low_cpu_mem_usage: bool = Field(default=False, description="pin host copies when used, not up front: less host "
                                    "memory, slower")
    disk_path: str | None = Field(default=None, description="keep the offloaded weights in files here instead of "
                                  "host memory")

    @model_validator(mode="after")
    def _check(self) -> GroupOffload:
        if self.record_stream and not self.use_stream:
            raise ValueError("record_stream=true needs use_stream=true")
        return self


class PartialResidency(Knob):
    """Keep the first transformer blocks resident on the GPU and stream the rest with prefetch.

    Exactly one of ``resident`` (bytes of blocks to keep) and ``resident_blocks`` (a count) is set.
    The streamed blocks live in pinned host memory and are copied on a side stream one block ahead.
    """

    mode: Literal["partial"] = "partial"
    resident: ByteSize | None = Field(default=None, description="bytes of blocks kept on the GPU (e.g. 7GB)")
    resident_blocks: int | None = Field(default=None, ge=0, description="how many blocks stay on the GPU")
    prefetch: int = Field(default=1, ge=1, le=4, description="streamed blocks in flight ahead of compute")

    @model_validator(mode="after")
    def _check(self) -> PartialResidency:
        if (self.resident is None) == (self.resident_blocks is None):
            raise ValueError("set exactly one of resident (a size such as 7GB) and resident_blocks (a count)")
        return self


def choose_streamed(sizes: list[int] | list[float], resident_bytes: int | None, resident_blocks: int | None) -> list[int]:
    """Which blocks partial residency streams: as few as possible, spread evenly between resident ones.

    Args:
        sizes: bytes of each block in execution order.
        resident_bytes: how many bytes of blocks may stay resident (or None).
        resident_blocks: how many blocks may stay resident (or None).
    """
    n = len(sizes)
    for k in range(n + 1):
        streamed = sorted({min(n - 1, int((j + 0.5) * n / k)) for j in range(k)}) if k else []
        if len(streamed) < k:  # rounding collided: fall back to the last k blocks
            streamed = list(range(n - k, n))
        kept = [i for i in range(n) if i not in set(streamed)]
        if resident_blocks is not None and len(kept) <= resident_blocks:
            return streamed
        if resident_bytes is not None and sum(sizes[i] for i in kept) <= resident_bytes:
            return streamed
    return list(range(n))


Offload = Annotated[
    NoOffload | ModelOffload | SequentialOffload | GroupOffload | PartialResidency,
    Field(discriminator="mode"),
    _shorthand("mode"),
]
OFFLOAD_MODES = ("none", "model", "sequential", "group", "partial")

# --------------------------------------------------------------------------------- quantization

QUANT_METHODS = ("int8_weight", "int8_dynamic", "fp8_dynamic", "fp8_weight", "int4_weight", "nf4")


class Quantize(Knob):
    """torchao ``quantize_`` on the component's Linear layers (``nf4``: bitsandbytes 4-bit NormalFloat).

    Speed at a DiT's 4096 image rows on the H200 (scripts/quant_kernels.py, three 3072-wide layers, against
    bf16): fp8_dynamic 0.81x compiled (2.75x eager), int8_dynamic 1.33x compiled (14.6x eager), NF4 1.29x,
    int8_weight 2.86x eager, int4_weight 27x (torchao's tinygemm kernel is made for a few rows: it saves
    memory, never time, in a diffusion transformer).

    ``exclude`` holds regular expressions (``re.search`` on the module's qualified name) of layers kept
    in the compute dtype, e.g. the sensitive AdaLN modulation (``norm1\\.linear``) or ``proj_out``.
    """

    method: Literal["int8_weight", "int8_dynamic", "fp8_dynamic", "fp8_weight", "int4_weight", "nf4"] = Field(
        description="*_weight: weights only, computed in the component's dtype; *_dynamic: activations too (fp8 "
        "needs SM 8.9); nf4: bitsandbytes 4-bit")
    granularity: Literal["row", "tensor"] = Field(default="row", description="dynamic methods: a scale per row "
                                                  "(fp8: Hopper only) or one per tensor")
    group_size: int = Field(default=128, ge=16, description="inputs per scale: int4_weight, and int8_weight where it tiles a layer's inputs")
    exclude: tuple[str, ...] = Field(default=(), description="regular expressions of layers kept unquantized "
                                     "(e.g. from fluxtune sensitivity)")

    @model_validator(mode="after")
    def _check(self) -> Quantize:
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"exclude pattern {pattern!r} is not a regular expression: {e}") from e
        if self.granularity == "tensor" and self.method in ("int8_weight", "fp8_weight", "int4_weight", "nf4"):
            raise ValueError(f"granularity=tensor applies to int8_dynamic and fp8_dynamic, not {self.method}")
        return self

    def tiles(self, inputs: int) -> bool:
        """Whether ``group_size`` divides a layer's inputs: int4 quantizes only such layers, int8 weight-only
        scales them per group (and per row otherwise)."""
        return inputs % self.group_size == 0

    @property
    def needs_fp8(self) -> bool:
        return self.method.startswith("fp8")

    @property
    def min_compute_capability(self) -> tuple[int, int] | None:
        """fp8 needs SM 8.9 (Ada); rowwise-scaled fp8 matmuls need SM 9.0 (Hopper)."""
        if self.method == "fp8_dynamic":
            return (9, 0) if self.granularity == "row" else (8, 9)
        if self.method == "fp8_weight":
            return (8, 9)
        return None


class LayerwiseCasting(Knob):
    """Store weights in fp8, upcast per layer for compute (memory only; cannot be undone)."""

    storage: Literal["float8_e4m3fn", "float8_e5m2"] = Field(default="float8_e4m3fn",
                                                             description="the fp8 format weights are stored in")
    skip: tuple[str, ...] | None = Field(
        default=None, description="module patterns kept in the compute dtype; None = diffusers defaults"
    )


DType = Literal["bfloat16", "float16", "float32"]


def _dtype_alias(value: Any) -> Any:
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    return aliases.get(value, value) if isinstance(value, str) else value


class Component(Knob):
    """Per-component knobs: where its weights live, in which precision, quantized or not."""

    dtype: Annotated[DType | None, BeforeValidator(_dtype_alias)] = Field(
        default=None, description="compute dtype; None = as loaded"
    )
    offload: Offload = NoOffload()
    layerwise_casting: LayerwiseCasting | None = None
    quantize: Annotated[Quantize | None, _shorthand("method")] = None

    @model_validator(mode="after")
    def _check(self) -> Component:
        if self.layerwise_casting is not None and self.quantize is not None:
            raise ValueError(
                "layerwise_casting and quantize do not combine (casting already-quantized weights "
                "is meaningless): keep one"
            )
        if isinstance(self.offload, GroupOffload) and self.offload.disk_path and self.quantize is not None:
            raise ValueError("group offload to disk cannot store torchao-quantized weights: drop disk_path or quantize")
        return self


class Vae(Component):
    """The VAE: component knobs plus tiling, slicing and memory format."""

    tiling: bool = Field(default=False, description="decode in overlapping tiles: memory follows the tile")
    tile_size: int | None = Field(default=None, ge=16, description="pixels; None = the VAE's own sample_size")
    slicing: bool = Field(default=False, description="decode one image of a batch at a time")
    channels_last: bool = Field(default=False, description="NHWC memory format (2-D convolution VAEs only)")

    @model_validator(mode="after")
    def _tile(self) -> Vae:
        if self.tile_size is not None and not self.tiling:
            raise ValueError("tile_size is set but tiling is false: set tiling=true")
        return self


# --------------------------------------------------------------------------------------- caches


class NoCache(Knob):
    """Every step computes every block."""

    kind: Literal["none"] = "none"


class FirstBlockCache(Knob):
    """Skip the remaining blocks when the first block's residual barely changed (ParaAttention FBCache)."""

    kind: Literal["first_block"] = "first_block"
    threshold: float = Field(default=0.08, gt=0.0, le=1.0, description="skip when the first block's output changed "
                             "by less than this (relative) since the last computed step")


class TaylorSeerCache(Knob):
    """Compute every ``cache_interval`` steps; between them extrapolate the attention outputs (Taylor series)."""

    kind: Literal["taylorseer"] = "taylorseer"
    cache_interval: int = Field(default=5, ge=2, description="steps from one computed step to the next")
    disable_cache_before_step: int = Field(default=10, ge=0, description="steps computed in full first")
    disable_cache_after_step: int | None = Field(default=None, ge=0, description="steps from here on computed in full")
    max_order: int = Field(default=1, ge=1, le=4, description="order of the extrapolation")


class MagCache(Knob):
    """Skip steps while FLUX.1's precomputed residual-magnitude ratios say little changes (a schedule known in
    advance: fluxtune predict counts it)."""

    kind: Literal["magcache"] = "magcache"
    threshold: float = Field(default=0.06, gt=0.0, le=1.0, description="accumulated magnitude error allowed before a "
                             "step is computed again")
    max_skip_steps: int = Field(default=3, ge=1, description="consecutive steps skipped at most")
    retention_ratio: float = Field(default=0.2, ge=0.0, le=1.0, description="share of the first steps never skipped")


Cache = Annotated[
    NoCache | FirstBlockCache | TaylorSeerCache | MagCache, Field(discriminator="kind"), _shorthand("kind")
]
CACHE_KINDS = ("none", "first_block", "taylorseer", "magcache")

# ------------------------------------------------------------------------------ compile, attention


class Tiling(Knob):
    """Regional denoising (MultiDiffusion): each step the transformer runs on overlapping square tiles of
    the latent, whose predictions are blended with weights that ramp down across the overlap; the
    prompt's conditioning is shared. Activation memory then follows the tile, not the image."""

    mode: Literal["none", "regional"] = Field(default="none", description="regional: denoise overlapping tiles of "
                                              "the latent (FLUX.1), for images larger than fit or than is fast")
    tile: int = Field(default=1024, ge=64, description="tile side in pixels (a multiple of 16)")
    overlap: int = Field(default=128, ge=0, description="pixels two neighbouring tiles share (a multiple of 16)")

    @model_validator(mode="after")
    def _sizes(self) -> Tiling:
        for name in ("tile", "overlap"):
            value = getattr(self, name)
            if value % 16:
                raise ValueError(f"tiling.{name}={value}: use a multiple of 16 (one FLUX latent token), e.g. "
                                 f"{max(16, value // 16 * 16)}")
        if self.overlap >= self.tile // 2:
            raise ValueError(f"tiling.overlap={self.overlap}: use less than half the tile ({self.tile // 2})")
        return self


class Compile(Knob):
    """torch.compile of the transformer: ``regional`` compiles each repeated block, ``full`` the model."""

    mode: Literal["off", "regional", "full"] = Field(default="off", description="regional: each repeated block "
                                                     "(seconds to compile); full: the whole transformer")
    inductor_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        default="default", description="torch.compile's mode")
    fullgraph: bool = Field(default=False, description="fail instead of falling back at a graph break (no hooks "
                            "inside: no caches or streaming)")
    dynamic: bool | None = Field(default=None, description="torch.compile's dynamic shapes; None = torch decides")
    inductor_flags: bool = Field(
        default=True, description="conv_1x1_as_mm, coordinate_descent_tuning, epilogue_fusion=False (flux-fast)"
    )
    fuse_qkv: bool = Field(default=False, description="fuse Q/K/V projections (before quantization)")
    vae_decode: bool = Field(default=False, description="compile the VAE's decode too")
    recompile_limit: int | None = Field(default=None, ge=1, description="torch._dynamo's recompile limit; None = "
                                        "torch's")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


class Attention(Knob):
    backend: str = Field(default="native", description="a diffusers attention backend name")

    @model_validator(mode="after")
    def _name(self) -> Attention:
        if not re.fullmatch(r"[a-z0-9_]+", self.backend):
            raise ValueError(f"backend {self.backend!r} is not a diffusers attention backend name")
        return self


class Matmul(Knob):
    """Process-wide matmul settings (cuBLAS), for the components computing in float16."""

    fp16_accumulation: bool = Field(
        default=False,
        description="float16 GEMMs accumulate in float16 (torch.backends.cuda.matmul.allow_fp16_accumulation): "
        "twice the float32-accumulate rate on GeForce cards and the A10G, the same rate on data-center "
        "cards; needs a component in float16 (transformer.dtype: float16)",
    )


class Modulation(Knob):
    """The transformer's per-block adaptive-norm modulation (adaLN: shift, scale and gate from the timestep)."""

    cache: bool = Field(
        default=False,
        description="compute each block's modulation once per timestep, keep it in host memory and drop "
        "those weights from the GPU (Qwen-Image: a third of the transformer's weights); exact; a new step "
        "schedule computes it again, in one pass at the first step",
    )


# ----------------------------------------------------------------------------------- generation


class Generation(Knob):
    """The call the profile was validated for; ``apply`` makes these the pipeline's defaults."""

    steps: int = Field(default=28, ge=1, le=1000, description="denoising steps")
    guidance: float = Field(default=3.5, ge=0.0, description="guidance_scale (FLUX: distilled guidance; DiT: CFG)")
    height: int | None = Field(default=None, ge=16, description="pixels, multiple of 16; None = model default")
    width: int | None = Field(default=None, ge=16, description="pixels, multiple of 16; None = model default")
    max_sequence_length: int = Field(default=512, ge=1, le=512, description="text tokens the encoder pads to")
    images_per_prompt: int = Field(default=1, ge=1, le=64, description="images per call (the batch)")
    negative_prompt: str | None = Field(
        default=None, description="true CFG's negative prompt (Qwen-Image, FLUX.1): with true_cfg_scale > 1 the "
        "transformer runs twice a step and the text encoder twice a call; None = no true CFG")
    true_cfg_scale: float | None = Field(
        default=None, ge=0.0, description="true CFG's scale; None = the pipeline's default (Qwen-Image 4.0, FLUX.1 1.0)")
    batch_cfg: bool = Field(
        default=False, description="run true CFG's two passes a step as one batch of two: a streamed transformer "
        "copies its blocks once a step instead of twice, for twice the activations")

    @model_validator(mode="after")
    def _sizes(self) -> Generation:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value % 16:
                lo, hi = value // 16 * 16, (value // 16 + 1) * 16
                raise ValueError(f"{name}={value} is not a multiple of 16; use {max(lo, 16)} or {hi}")
        return self


class Measured(Knob):
    """What a search or bench measured for this profile, and where."""

    status: Literal["measured", "unmeasured"] = "measured"
    source: str | None = None
    date: str | None = None
    hardware: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    model: str | None = None
    workload: dict[str, Any] = Field(default_factory=dict)
    latency_s: float | None = None
    throughput: float | None = Field(default=None, description="images per second at the profile's batch")
    first_call_s: float | None = None
    peak_allocated: ByteSize | None = None
    peak_reserved: ByteSize | None = None
    peak_nvml: ByteSize | None = None
    peak_host_rss: ByteSize | None = Field(
        default=None, description="peak host RSS of the measuring process and its children (bench: over load, "
        "apply and the runs)")
    quality: dict[str, float] = Field(default_factory=dict)
    study: str | None = None
    trial: int | None = None
    notes: str | None = None
    emulation: str | None = Field(default=None, description="what was and was not emulated, when measured under --emulate")
    workloads: tuple[dict[str, Any], ...] = Field(
        default=(), description="the same profile measured on other workloads (e.g. the tier's size and steps)")


# ----------------------------------------------------------------------------------------- LoRA

LORA_MODES = ("auto", "fuse", "adapter", "hotswap")


def _lora_defaults(value: Any) -> Any:
    # A bare string is a path; the adapter name defaults to the file stem, made a valid module key.
    if isinstance(value, str):
        value = {"path": value}
    if isinstance(value, dict) and value.get("adapter_name") is None and isinstance(value.get("path"), str):
        stem = re.split(r"[\\/]", value["path"])[-1].removesuffix(".safetensors")
        value = {**value, "adapter_name": re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "lora"}
    return value


class Lora(Knob):
    """A LoRA file and how it is applied.

    ``mode``: ``fuse`` bakes it into the base weights before quantization (fastest; switching restores a
    pristine host copy and re-quantizes), ``adapter`` keeps a separate peft adapter (unquantized or
    layerwise-cast transformer only), ``hotswap`` swaps weights into a compiled model without recompiling
    (ranks up to ``max_rank``), ``auto`` picks from the profile's other knobs.
    """

    path: str = Field(description="a .safetensors LoRA file (pickle files are never loaded)")
    adapter_name: str = Field(default="lora", description="default: the file stem")
    scale: float = Field(default=1.0, description="the LoRA's strength")
    mode: Literal["auto", "fuse", "adapter", "hotswap"] = Field(default="auto", description="fuse: baked into the "
                                                                 "weights; adapter: peft; hotswap: into compiled code")
    max_rank: int | None = Field(default=None, ge=1, description="hotswap only: the largest rank a swap may bring")

    @model_validator(mode="after")
    def _check(self) -> Lora:
        if not self.path.endswith(".safetensors"):
            raise ValueError(
                f"path={self.path!r} is not a .safetensors file; fluxtune never loads pickled LoRAs "
                "(.bin/.pt/.ckpt): convert it to safetensors"
            )
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.adapter_name):
            raise ValueError(
                f"adapter_name={self.adapter_name!r}: use letters, digits, '_' or '-' (no dots or spaces)"
            )
        if self.max_rank is not None and self.mode not in ("hotswap", "auto"):
            raise ValueError(f"max_rank={self.max_rank} applies to mode=hotswap (or auto), not mode={self.mode}")
        return self


LoraSpec = Annotated[Lora, BeforeValidator(_lora_defaults)]
