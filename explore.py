"""An attention explorer: one self-contained HTML page to *look* at a prompt's attention while it is sampled.

`explore(sd, prompt, out)` samples `prompt` while recording the attention probabilities of the
conditional rows (`hook.ctx.rows["cond"]`), and writes `out/index.html`, which needs no server and
fetches nothing: the data is embedded in the page. In it a reader
- picks a word and sees its cross-attention map over the image, at any sampling step and for one
  layer or for the mean of all the layers of a resolution (what `attention_maps` and P2P show);
- switches to self-attention, clicks a pixel and sees where that pixel attends.

The image of a step is the *predicted x0* of that step decoded by the VAE (x_t minus the predicted
noise, DDIM eq. 12's "predicted x0" term): what the model believes the final image is at that step.
The noisy latent x_t itself decodes to noise at the early steps, which teaches nothing.

What is kept, to bound the page's size (`plan` decides, `page_bytes` counts):
- cross-attention, averaged over heads, reduced to the prompt's words (a word of several tokens gets
  the mean of its tokens' columns, as `attention_maps`); per layer for maps of at most
  `CROSS_LAYER_SIDE`^2 = 32^2 queries (the official P2P `AttentionStore` keeps maps <= 32^2), and for
  every resolution the mean over its layers ("all layers"). SD at 512^2 keeps its 64^2 maps only as
  that mean.
- self-attention ([queries, keys] per layer: 4096^2 per step at SD's 64^2) only where a map has at
  most `teaching_side(latent)`^2 queries: 16^2 on SD at 512^2 (P2P's self-attention limit), 8^2 on
  sdlens-tiny (its 16^2 layers attend almost uniformly); averaged over heads; per layer for maps of at
  most `SELF_LAYER_SIDE`^2 = 8^2 queries, larger ones (SD's 16^2) only as the mean over their layers
  (per layer, SD's five 16^2 layers would take 20 MB at 50 steps).
- every map quantised to uint8, divided by its own maximum (255 = the map's max), the max kept as a
  float32 `scale`: value = q / 255 * scale, off by at most scale / 510. A cross map is one (step, word),
  a self-attention map one (step, query pixel).
- the arrays are packed into one little-endian blob, base64-encoded in a <script> tag (zlib saved only
  10% on sdlens-tiny's maps: not worth a decompression step in the page); the step images are PNG (up
  to 256^2 pixels) or JPEG (larger) data URLs.

Page format (for `read_page` and for readers): <script id="sdlens-meta" type="application/json"> holds
the metadata: prompt, words, steps, timesteps, image size, images (data URLs), `cross` and `self`
(lists of map sources: label, size [h, w], the hook names averaged, and {offset, dtype, shape} of their
`maps` and `scales` in the blob); <script id="sdlens-data"> holds base64(blob).
Cross `maps` are uint8 [steps, words, h*w] with `scales` float32 [steps, words]; self `maps` uint8
[steps, h*w, h*w] (query, key) with `scales` float32 [steps, h*w].
"""
import base64
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np
import torch

from .editing.attention_maps import word_columns
from .outputs import Staged, Text, check_target
from .pipeline import to_pil
from .schedulers.ddim import alpha_at, alphas_cumprod, split_prediction
from .explore_page import PAGE, SCRIPT

CROSS_LAYER_SIDE = 32  # per-layer cross maps up to 32^2 queries, as the official AttentionStore keeps
SELF_LAYER_SIDE = 8  # per-layer self-attention up to 8^2 queries; larger kept maps (16^2) as the mean only
PNG_MAX_PIXELS = 256 * 256  # step images up to this size are PNG (lossless); larger ones JPEG
JPEG_QUALITY = 85


def teaching_side(latent_hw) -> int:
    """The map side the page opens on and the largest self-attention kept: 16 (P2P's maps and its
    self-attention limit, 16^2 on SD at 512^2), but at most half the latent side (8 on sdlens-tiny,
    whose 16^2 layers attend almost uniformly)."""
    return max(1, min(16, min(latent_hw) // 2))


@dataclass
class Source:
    """One map the page can show: one layer (`names` has one hook) or the mean of the layers of a size."""
    kind: str  # "cross_attention" or "self_attention"
    label: str
    size: Tuple[int, int]
    names: List[str] = field(default_factory=list)


def plan(unet, latent_hw) -> Dict[str, List[Source]]:
    """{"cross": [...], "self": [...]}: the map sources the page keeps for a latent of `latent_hw`,
    largest resolution first, each resolution's "all layers" mean before its single layers."""
    out = {}
    side = teaching_side(latent_hw)
    for kind, key in (("cross_attention", "cross"), ("self_attention", "self")):
        by_size: Dict[Tuple[int, int], List[str]] = {}
        for n in unet.hook_names(kind=kind, point="probs"):
            by_size.setdefault(tuple(unet.hook_info(n).map_size(latent_hw)), []).append(n)
        sources = []
        for (h, w), names in sorted(by_size.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
            if kind == "self_attention" and h * w > side * side:
                continue  # [h w, h w] per layer per step: too big to keep
            label = f"all {len(names)} layers at {h}x{w} (mean)" if len(names) > 1 else layer_label(unet, names[0], (h, w))
            sources.append(Source(kind, label, (h, w), names))
            layer_side = CROSS_LAYER_SIDE if kind == "cross_attention" else SELF_LAYER_SIDE
            if h * w <= layer_side ** 2 and len(names) > 1:
                sources += [Source(kind, layer_label(unet, n, (h, w)), (h, w), [n]) for n in names]
        out[key] = sources
    return out


def layer_label(unet, name, size) -> str:
    i = unet.hook_info(name)
    where = "middle block" if i.place == "mid" else f"{i.place} block {i.block}"
    tb = f", transformer block {i.transformer_block}" if i.transformer_block > 0 else ""
    return f"{where}{tb} ({size[0]}x{size[1]})"


def page_bytes(unet, latent_hw, words: int, steps: int) -> Dict[str, int]:
    """Bytes of the maps the page keeps (before compression and base64, which adds 4/3), from the
    shapes alone: {"cross": ..., "self": ...}. Add the step images (PNG / JPEG) for the page."""
    p = plan(unet, latent_hw)
    cross = sum(steps * words * (h * w + 4) for h, w in (s.size for s in p["cross"]))
    selfb = sum(steps * h * w * (h * w + 4) for h, w in (s.size for s in p["self"]))
    return {"cross": cross, "self": selfb}


def quantise(m: torch.Tensor):
    """[..., n] maps >= 0 -> (uint8 [..., n] with 255 at each map's maximum, float32 scales [...])."""
    m = m.float()
    scale = m.amax(-1)
    q = (m / scale.clamp_min(1e-30)[..., None] * 255).round().clamp(0, 255).to(torch.uint8)
    return q.numpy(), scale.numpy().astype(np.float32)


class Blob:
    """Arrays packed one after another (each at a multiple of 4 bytes, so JS can view float32 in place)."""

    def __init__(self):
        self.parts, self.size = [], 0

    def add(self, a: np.ndarray) -> dict:
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        entry = {"offset": self.size, "dtype": str(a.dtype.name), "shape": list(a.shape)}
        pad = -a.nbytes % 4
        self.parts += [a.tobytes(), b"\0" * pad]
        self.size += a.nbytes + pad
        return entry

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def image_url(image) -> str:
    buf = io.BytesIO()
    if image.width * image.height <= PNG_MAX_PIXELS:
        image.save(buf, format="PNG", optimize=True)
        kind = "png"
    else:
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
        kind = "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@torch.no_grad()
def explore(sd, prompt: str, out, *, steps=50, guidance_scale=7.5, seed=0, force=False, progress=True) -> str:
    """Sample `prompt` and write the attention explorer `out/index.html` (see the module docstring);
    returns its path. All or nothing: on any error no file is left. An existing index.html is
    refused unless `force`."""
    if not isinstance(prompt, str) or not prompt.split():
        raise ValueError(f"prompt must be a non-empty string, not {prompt!r}")
    check_target(out, folder=True)
    path = os.path.join(out, "index.html")
    if os.path.lexists(path) and not force:
        raise ValueError(f"{path} exists; pass --force (force=True) or choose another --out")
    text = build(sd, prompt, steps=steps, guidance_scale=guidance_scale, seed=seed, progress=progress)
    with Staged(out, force) as o:
        o.save(Text(text), "index.html")
    return path


def build(sd, prompt: str, *, steps=50, guidance_scale=7.5, seed=0, progress=True) -> str:
    """The explorer page for `prompt`, as HTML text (what `explore` writes; the demo saves it too)."""
    if not isinstance(prompt, str) or not prompt.split():
        raise ValueError(f"prompt must be a non-empty string, not {prompt!r}")
    columns = word_columns(sd.tokenizer, prompt)  # {word: token positions}; a truncated word fails here
    words = list(columns)
    height, width = sd.check_size(None, None)
    latent_hw = (height // sd.latent_factor, width // sd.latent_factor)
    sources = plan(sd.unet, latent_hw)

    # Word columns as a matrix: probs [q, 77] @ mix [77, words] = each word's mean over its tokens.
    keys = sd.text_encoder.cfg.max_positions
    mix = torch.zeros(keys, len(words))
    for k, w in enumerate(words):
        for p in columns[w]:
            mix[p, k] += 1 / len(columns[w])

    cross_names = {n for s in sources["cross"] for n in s.names}
    self_names = {n for s in sources["self"] for n in s.names}
    record: Dict[str, Dict[int, torch.Tensor]] = {n: {} for n in cross_names | self_names}

    def keep(probs, hook):
        ctx = hook.ctx
        if ctx is None or "cond" not in ctx.rows:  # an unconditional-only pass: nothing to keep
            return None
        p = probs[ctx.slice("cond")][0].float().mean(0)  # the prompt's conditional row, mean over heads
        if hook.name in cross_names:
            p = p @ mix[: p.shape[-1]].to(p.device)  # [q, words]
        record[hook.name][ctx.step] = p.cpu()
        return None

    # The predicted x0 of each step, from the guided model output the sampler gets.
    acp = alphas_cumprod(sd.scheduler)
    x0s, ts = [], []

    def denoiser(context, scale, num_steps):
        inner = sd.denoiser(context, scale, num_steps)

        def denoise(x, t, step):
            out = inner(x, t, step)
            x0, _ = split_prediction(sd.scheduler, out.to(x.dtype), x, alpha_at(sd.scheduler, acp, int(t)))
            x0s.append(x0.float().cpu())
            ts.append(int(t))
            return out
        return denoise

    with sd.unet.hooks({n: keep for n in record}):
        sd.generate(prompt, steps=steps, guidance_scale=guidance_scale, seed=seed, output="tensor",
                    progress=progress, denoiser=denoiser)
    images = []
    for i in range(0, len(x0s), 8):  # decode a few at a time: 50 SD images at once would be 3 GB of activations
        images += to_pil(sd.decode_latents(torch.cat(x0s[i:i + 8]).to(sd.device)))

    blob = Blob()
    meta = {"prompt": prompt, "words": words, "steps": steps, "timesteps": ts, "guidance_scale": guidance_scale,
            "seed": seed, "model": sd.name or sd.family, "image": [height, width], "latent": list(latent_hw),
            "images": [image_url(im) for im in images], "cross": [], "self": []}
    for key, cross in (("cross", True), ("self", False)):
        for s in sources[key]:
            # [steps, layers, q, words or keys] -> the mean over the layers of this source
            per_step = torch.stack([torch.stack([record[n][i] for n in s.names]).mean(0) for i in range(steps)])
            q, scales = quantise(per_step.transpose(1, 2) if cross else per_step)  # cross: [steps, words, q]
            meta[key].append({"label": s.label, "size": list(s.size), "names": s.names,
                              "maps": blob.add(q), "scales": blob.add(scales)})
    meta["default"] = next(i for i, s in enumerate(meta["cross"]) if max(s["size"]) <= teaching_side(latent_hw))
    return page(meta, base64.b64encode(blob.bytes()).decode("ascii"))


def _script_json(obj) -> str:
    """JSON safe inside a <script> element: "</script>" in a prompt must not end the element."""
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")


def page(meta, data) -> str:
    title = html.escape(meta["prompt"])
    return (PAGE.replace("{TITLE}", title)
            .replace("{SELF_SIDE}", str(max([s["size"][0] for s in meta["self"]] or [0])))
            .replace("{META}", _script_json(meta)).replace("{DATA}", data).replace("{SCRIPT}", SCRIPT))


def read_page(path) -> dict:
    """Decode a page back: {"meta": ..., "cross": [float32 [steps, words, h, w]], "self": [float32
    [steps, h*w, h, w]], "images": [PIL]}, dequantised (q / 255 * scale), in the order of meta's lists."""
    from PIL import Image
    with open(path, encoding="utf-8") as f:
        text = f.read()
    meta = json.loads(re.search(r'<script id="sdlens-meta" type="application/json">(.*?)</script>', text, re.S).group(1))
    blob = base64.b64decode(
        re.search(r'<script id="sdlens-data" type="application/octet-stream">(.*?)</script>', text, re.S).group(1))

    def array(a):
        n = math.prod(a["shape"])
        return np.frombuffer(blob, np.dtype(a["dtype"]).newbyteorder("<"), n, a["offset"]).reshape(a["shape"])

    def maps(s):
        h, w = s["size"]
        m = array(s["maps"]).astype(np.float32) / 255 * array(s["scales"])[..., None]
        return m.reshape(*m.shape[:-1], h, w)
    images = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB") for u in meta["images"]]
    return {"meta": meta, "cross": [maps(s) for s in meta["cross"]], "self": [maps(s) for s in meta["self"]],
            "images": images}
