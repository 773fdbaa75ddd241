"""vae: tiling (with a tile size), slicing and channels_last memory format."""

from __future__ import annotations

from fluxtune.tuning.base import VAE, Context, Handler, register

_TILE_ATTRS = ("tile_sample_min_size", "tile_latent_min_size", "tile_sample_min_height", "tile_sample_min_width",
               "tile_sample_stride_height", "tile_sample_stride_width")


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
        if v.channels_last:
            import torch

            ranks = {p.dim() for m in vae.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)
                     for p in m.parameters(recurse=False) if p.dim() > 1}
            if ranks - {4}:
                # channels_last is a 2-D layout: Qwen-Image's and the video VAEs convolve in 3-D.
                return [f"vae.channels_last=true: {type(vae).__name__} has {max(ranks) - 2}-D convolutions and "
                        "channels_last is for 2-D ones; set vae.channels_last=false"]
        return []

    def apply(self, ctx: Context) -> None:
        import torch

        v = ctx.profile.vae
        vae = ctx.components().get("vae")
        if vae is None:
            return
        if v.tiling:
            # Two tiling APIs in diffusers 0.42: square tiles (tile_sample_min_size: the FLUX, SD and DiT
            # VAEs) and height/width tiles with strides (the Qwen-Image and video VAEs).
            attrs = [a for a in _TILE_ATTRS if hasattr(vae, a)]
            saved = {a: getattr(vae, a) for a in attrs}
            vae.enable_tiling()
            if v.tile_size is not None:
                # enable_tiling() takes no size for the square API: its sizes are plain attributes.
                scale = 2 ** (len(vae.config.block_out_channels) - 1) if hasattr(vae.config, "block_out_channels") else 8
                sizes = {"tile_sample_min_size": v.tile_size, "tile_latent_min_size": max(1, v.tile_size // scale),
                         "tile_sample_min_height": v.tile_size, "tile_sample_min_width": v.tile_size,
                         # diffusers' default overlap: stride 3/4 of the tile (192 of 256 px)
                         "tile_sample_stride_height": v.tile_size * 3 // 4,
                         "tile_sample_stride_width": v.tile_size * 3 // 4}
                for a in attrs:
                    setattr(vae, a, sizes[a])

            def undo_tiling() -> None:
                vae.disable_tiling()
                for a, value in saved.items():
                    setattr(vae, a, value)

            ctx.undo.append((self.name, undo_tiling))
            size = getattr(vae, "tile_sample_min_size", None) or getattr(vae, "tile_sample_min_height", None)
            ctx.report.add(self.name, "vae", f"tiling, tiles of {size}px")
        if v.slicing:
            vae.enable_slicing()
            ctx.undo.append((self.name, vae.disable_slicing))
            ctx.report.add(self.name, "vae", "slicing (one image of the batch at a time)")
        if v.channels_last:
            vae.to(memory_format=torch.channels_last)
            ctx.undo.append((self.name, lambda: vae.to(memory_format=torch.contiguous_format)))
            ctx.report.add(self.name, "vae", "channels_last")
