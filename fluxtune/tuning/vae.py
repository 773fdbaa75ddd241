"""vae: tiling (with a tile size), slicing and channels_last memory format."""

from __future__ import annotations

from fluxtune.tuning.base import VAE, Context, Handler, register


@register
class VaeHandler(Handler):
    name = "vae"
    phase = VAE

    def check(self, ctx: Context) -> list[str]:
        v = ctx.profile.vae
        vae = ctx.components().get("vae")
        if vae is None:
            return ["vae.* is set but this pipeline has no vae"] if (v.tiling or v.slicing or v.channels_last) else []
        if v.tiling and not hasattr(vae, "enable_tiling"):
            return [f"vae.tiling=true: {type(vae).__name__} has no tiling; set vae.tiling=false"]
        return []

    def apply(self, ctx: Context) -> None:
        import torch

        v = ctx.profile.vae
        vae = ctx.components().get("vae")
        if vae is None:
            return
        if v.tiling:
            saved = (vae.tile_sample_min_size, vae.tile_latent_min_size)
            vae.enable_tiling()
            if v.tile_size is not None:
                # diffusers 0.42 enable_tiling() takes no size: the sizes are plain attributes.
                scale = 2 ** (len(vae.config.block_out_channels) - 1)
                vae.tile_sample_min_size = v.tile_size
                vae.tile_latent_min_size = max(1, v.tile_size // scale)

            def undo_tiling() -> None:
                vae.disable_tiling()
                vae.tile_sample_min_size, vae.tile_latent_min_size = saved

            ctx.undo.append((self.name, undo_tiling))
            ctx.report.add(self.name, "vae", f"tiling, tiles of {vae.tile_sample_min_size}px")
        if v.slicing:
            vae.enable_slicing()
            ctx.undo.append((self.name, vae.disable_slicing))
            ctx.report.add(self.name, "vae", "slicing (one image of the batch at a time)")
        if v.channels_last:
            vae.to(memory_format=torch.channels_last)
            ctx.undo.append((self.name, lambda: vae.to(memory_format=torch.contiguous_format)))
            ctx.report.add(self.name, "vae", "channels_last")
