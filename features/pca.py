"""Diffusion features as pictures: PCA of ResBlock features and of self-attention q/k.

(Moved here from `editing/`: these are analysis, not editing.)

As in the Plug-and-Play paper's feature figures: features of the guidance image's inverted latent
at a chosen step, projected on their top 3 principal components and shown as RGB. A set of images
shares one PCA basis, so the same semantic part gets the same colour in every image.
"""
from typing import Dict, List, Sequence

import torch
from einops import rearrange

from ..hooks import StepContext
from .extract import to_spatial


def pca_rgb(feats: List[torch.Tensor], k: int = 3) -> List[torch.Tensor]:
    """[C,h,w] feature maps (one per image, same C) -> [k,h,w] images in [0,1] on a shared basis.

    Deterministic: components come from an SVD of the pooled, centred features, and each
    component's sign is fixed so that its largest loading is positive."""
    flat = torch.cat([rearrange(f.float(), "c h w -> (h w) c") for f in feats])
    mean = flat.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    comps = vh[:k]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * signs
    proj = (flat - mean) @ comps.T  # [N, k]
    lo, hi = proj.min(0).values, proj.max(0).values
    proj = (proj - lo) / (hi - lo).clamp_min(1e-12)
    out, i = [], 0
    for f in feats:
        n = f.shape[1] * f.shape[2]
        out.append(rearrange(proj[i:i + n], "(h w) k -> k h w", h=f.shape[1]))
        i += n
    return out


@torch.no_grad()
def collect(sd, latents: Sequence[torch.Tensor], t: int, names: Sequence[str], prompt: str = "") -> Dict[str, List[torch.Tensor]]:
    """Run the UNet once per given latent (e.g. an inverted one) at timestep t and return
    {hook name: [per image [C,h,w]]}, each value made spatial as `extract` makes it. SDXL's context
    carries each latent's image size (`sd.image_size`)."""
    out, contexts = {n: [] for n in names}, {}
    for z in latents:
        size = sd.image_size(z)
        if size not in contexts:
            contexts[size] = sd.encode_prompt([prompt], size=size)
        context = contexts[size]
        with sd.unet.record(lambda n: n in out) as store, \
                sd.unet.step_context(StepContext(step=0, t=t, num_steps=1, rows={"cond": [0]})):
            sd.unet(z, t, context)
        for n in names:
            out[n].append(to_spatial(store[n][-1], sd.unet.hook_info(n), z.shape[-2:])[0])
    return out


def resolve_layers(sd, layers: Sequence[str]) -> List[str]:
    """'output_blocks.4' -> its ResBlock's hook_out; full hook names pass through."""
    names, found = set(sd.unet.hook_names()), []
    for layer in layers:
        if layer in names:
            found.append(layer)
        elif f"{layer}.0.hook_out" in names:
            found.append(f"{layer}.0.hook_out")
        else:
            raise ValueError(f"layer {layer!r} is not a hook point or a block with a ResBlock; see sd.unet.hook_names()")
    return found
