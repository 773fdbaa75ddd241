"""4-bit NormalFloat (NF4) weights with bitsandbytes: the only bitsandbytes importer.

A chosen ``nn.Linear`` keeps its identity (hooks, LoRA wrappers and the streamer's records refer to it):
its weight becomes a bitsandbytes ``Params4bit`` (packed 4-bit values, an absmax per 64 weights, the
absmaxes themselves quantized to 8 bits: ~0.52 bytes per weight), quantized where the weight is, and its
forward becomes ``bitsandbytes.matmul_4bit``, which dequantizes to the activations' dtype.

That forward is the class's, not the instance's: the layer's class becomes a subclass shared by every NF4
layer of its class. A per-instance forward (a ``HookRegistry`` hook, as before) is an object TorchDynamo
guards on by identity, so regional compile recompiled for every block until its recompile limit, then ran
the rest eager (Qwen-Image replica, 2026-12-05: 18.75 s a call with a 9.1 s spread).

This is the format of diffusers' ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")`` checkpoints, applied to a pipeline already loaded. bitsandbytes keeps the
scales in a ``quant_state`` beside the tensor, which ``Params4bit.to`` moves along; fluxtune's streamer
moves tensors, not modules, so NF4 components stay resident or use model offload.
"""

from __future__ import annotations

from typing import Any

from fluxtune.errors import MissingDependencyError

BLOCKSIZE = 64
"""Weights per absmax (bitsandbytes' default for 4-bit)."""


def bytes_per_weight(numel: int) -> float:
    """Bytes of ``numel`` NF4 weights: 4-bit codes, an 8-bit absmax per block, a float32 scale and offset
    per 256 absmaxes (double quantization)."""
    blocks = -(-numel // BLOCKSIZE)
    return numel * 0.5 + blocks + (-(-blocks // 256)) * 8


def available() -> bool:
    """Whether bitsandbytes is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as e:
        raise MissingDependencyError(
            f"quantize.method=nf4 needs bitsandbytes: pip install 'fluxtune[nf4]' (or bitsandbytes>=0.46) ({e})"
        ) from e
    return bitsandbytes


def is_nf4(weight: Any) -> bool:
    """Whether a weight is a quantized bitsandbytes 4-bit parameter (no import of bitsandbytes)."""
    return getattr(weight, "quant_state", None) is not None


_CLASSES: dict[type, type] = {}


def _nf4_class(base: type) -> type:
    """The NF4 subclass of ``base`` (one per Linear class, so every NF4 layer shares one forward)."""
    cls = _CLASSES.get(base)
    if cls is None:

        def forward(self: Any, x: Any) -> Any:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return _bnb().matmul_4bit(x, self.weight.t(), bias=bias, quant_state=self.weight.quant_state)

        cls = type(f"NF4{base.__name__}", (base,), {"forward": forward, "__doc__": f"{base.__name__} with NF4 weights."})
        _CLASSES[base] = cls
    return cls


def quantize_linear(linear: Any) -> None:
    """Quantize one ``nn.Linear`` in place (where its weight is) and route its forward through NF4."""
    bnb = _bnb()
    w = linear.weight
    param = bnb.nn.Params4bit(w.data.contiguous(), requires_grad=False, quant_type="nf4",
                              compress_statistics=True, blocksize=BLOCKSIZE)
    # Params4bit quantizes on its first move to a device; moving to where the weight already is does it.
    linear.weight = param.to(w.device)
    # The same object, another class: hooks, LoRA wrappers and the streamer's records still refer to it.
    if type(linear) not in _CLASSES.values():
        linear.__class__ = _nf4_class(type(linear))
