"""generation.batch_cfg: true CFG's two transformer passes a step run as one batch of two.

diffusers' Qwen-Image and FLUX.1 pipelines run true CFG (a negative prompt) as two forwards a step, the
prompt's then the negative prompt's, at the same latents and timestep. A streamed transformer copies its
non-resident blocks in every forward; batched, it copies them once a step for both rows, for twice the
activations. On a card whose link bounds the step that is up to half the step's time.

How: the pipeline's ``encode_prompt`` is wrapped to record the call's prompt and negative-prompt
embeddings (the pipeline encodes them in that order). The transformer's forward, called with the recorded
prompt embeddings, runs both rows as one batch and returns the first half; the next forward, with the same
latents and the recorded negative embeddings, gets the second half back without running. Qwen-Image's text
lengths differ, so both are padded to one length and the padding is masked, as diffusers does for a batch of
prompts. A call that does not match (other inputs, attention kwargs such as IP-adapter embeddings, text
lengths FLUX.1 cannot mask) runs as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fluxtune.pipelines import TRUE_CFG_FAMILIES
from fluxtune.tuning.base import GENERATION, Context, Handler, register


@dataclass
class _State:
    family: str
    encoded: list[tuple[Any, ...]] = field(default_factory=list)
    """This call's encode_prompt outputs: the prompt's, then the negative prompt's."""
    stash: tuple[Any, Any] | None = None  # (the latents tensor, the negative rows' output)
    same_text_ids: bool | None = None  # FLUX.1: compared once a call (a device sync), not every step

    def reset(self) -> None:
        self.encoded.clear()
        self.stash = None
        self.same_text_ids = None


def _split(out: Any, n: int) -> tuple[Any, Any]:
    """The transformer's output (a tuple or an output object) cut into its first ``n`` rows and the rest."""
    if isinstance(out, tuple):
        return (out[0][:n], *out[1:]), (out[0][n:], *out[1:])
    first, rest = out.sample[:n], out.sample[n:]
    return type(out)(sample=first), type(out)(sample=rest)


def _pad(embeds: Any, mask: Any, length: int) -> tuple[Any, Any]:
    import torch

    b, n = embeds.shape[:2]
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=embeds.device)
    if n == length:
        return embeds, mask.bool()
    pad = embeds.new_zeros(b, length - n, *embeds.shape[2:])
    return torch.cat([embeds, pad], 1), torch.cat([mask.bool(), mask.new_zeros(b, length - n, dtype=torch.bool)], 1)


def _batched_kwargs(state: _State, kw: dict[str, Any]) -> dict[str, Any] | None:
    """The forward's keywords for both rows, or None where this call cannot be batched."""
    import torch

    pos, neg = state.encoded[0], state.encoded[1]  # FLUX.1: (embeds, pooled, text ids); Qwen-Image: (embeds, mask)
    if kw.get("joint_attention_kwargs") or kw.get("attention_kwargs") or kw.get("controlnet_block_samples") is not None:
        return None
    out = dict(kw)
    out["hidden_states"] = torch.cat([kw["hidden_states"], kw["hidden_states"]])
    out["timestep"] = torch.cat([kw["timestep"], kw["timestep"]])
    if torch.is_tensor(kw.get("guidance")):
        out["guidance"] = torch.cat([kw["guidance"], kw["guidance"]])
    if state.family == "qwenimage":
        length = max(pos[0].shape[1], neg[0].shape[1])
        e1, m1 = _pad(pos[0], pos[1], length)
        e2, m2 = _pad(neg[0], neg[1], length)
        out["encoder_hidden_states"] = torch.cat([e1, e2])
        out["encoder_hidden_states_mask"] = torch.cat([m1, m2])
        if isinstance(kw.get("img_shapes"), list):
            out["img_shapes"] = kw["img_shapes"] * 2
        return out
    # FLUX.1: T5 pads every prompt to max_sequence_length and has no text mask; text ids are per token.
    if state.same_text_ids is None:
        state.same_text_ids = pos[0].shape == neg[0].shape and bool(torch.equal(pos[2], neg[2]))
    if not state.same_text_ids:
        return None
    out["encoder_hidden_states"] = torch.cat([pos[0], neg[0]])
    out["pooled_projections"] = torch.cat([pos[1], neg[1]])
    return out


def _forward(state: _State, original: Any, *args: Any, **kw: Any) -> Any:
    stash, state.stash = state.stash, None
    text = kw.get("encoder_hidden_states")
    if args or len(state.encoded) < 2 or text is None:
        return original(*args, **kw)
    if stash is not None and text is state.encoded[1][0] and kw.get("hidden_states") is stash[0]:
        return stash[1]  # the negative prompt's rows, computed with the prompt's
    if text is not state.encoded[0][0]:
        return original(*args, **kw)
    batched = _batched_kwargs(state, kw)
    if batched is None:
        return original(*args, **kw)
    first, rest = _split(original(**batched), kw["hidden_states"].shape[0])
    state.stash = (kw["hidden_states"], rest)
    return first


def _encode(state: _State, original: Any, *args: Any, **kw: Any) -> Any:
    out = original(*args, **kw)
    if isinstance(out, tuple) and len(state.encoded) < 2:
        state.encoded.append(out)
    return out


@register
class CfgBatchHandler(Handler):
    name = "batch_cfg"
    phase = GENERATION + 1  # outermost: after placement, cache and compile have wrapped the transformer

    def check(self, ctx: Context) -> list[str]:
        g = ctx.profile.generation
        if not g.batch_cfg:
            return []
        if ctx.family not in TRUE_CFG_FAMILIES:
            return [f"generation.batch_cfg=true: {type(ctx.pipe).__name__} runs no true CFG (two passes a step) to "
                    f"batch; the {' and '.join(TRUE_CFG_FAMILIES)} families do (set it false)"]
        if g.negative_prompt is None:
            return ["generation.batch_cfg=true batches true CFG's two passes, and true CFG is off: set "
                    "generation.negative_prompt (e.g. ' ') or batch_cfg=false"]
        if ctx.profile.compile.mode == "full":
            return ["generation.batch_cfg=true wraps the transformer's forward, which compile.mode=full traces; "
                    "use compile.mode=regional"]
        if "transformer" not in ctx.components() or not callable(getattr(ctx.pipe, "encode_prompt", None)):
            return ["generation.batch_cfg=true: this pipeline has no transformer or encode_prompt to batch"]
        return []

    def apply(self, ctx: Context) -> None:
        import functools

        if not ctx.profile.generation.batch_cfg:
            return
        t, pipe = ctx.components()["transformer"], ctx.pipe
        state = _State(ctx.family)
        had = {"forward": "forward" in vars(t), "encode": "encode_prompt" in vars(pipe)}
        old_forward, old_encode = t.forward, pipe.encode_prompt
        t.forward = functools.partial(_forward, state, old_forward)
        pipe.encode_prompt = functools.partial(_encode, state, old_encode)
        ctx.before_call.append(state.reset)
        ctx.after_call.append(state.reset)  # no tensors of a finished call kept alive

        def undo() -> None:
            if had["forward"]:
                t.forward = old_forward
            else:
                del t.forward
            if had["encode"]:
                pipe.encode_prompt = old_encode
            else:
                del pipe.encode_prompt

        ctx.undo.append((self.name, undo))
        ctx.report.add(self.name, "transformer", "true CFG's two passes run as one batch of two a step "
                       "(a streamed transformer copies its blocks once for both)")
