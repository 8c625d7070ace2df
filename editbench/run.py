"""PIE-Bench's editing runs (Ju et al. 2024, "PnP Inversion"), one row per image and method.

A method is "inversion+editor", as the PIE-Bench tables name them. Each edit reproduces the
per-item decisions of the official scripts (cure-lab/PnPInversion, cited as file:line):

P2P (run_editing_p2p.py:120-138, models/p2p_editor.py): SD 1.4, 50 steps, w = 7.5, cross 0.4,
  self 0.6; blend words (blended_word[0] in the source, [1] in the target) for a LocalBlend
  (threshold 0.3, start 0.2, attention_control.py:123), and the target word re-weighted by 2
  (eq_params). The controller is always AttentionRefine: `is_replace_controller` defaults to False
  (p2p_editor.py:43) and the script never passes it. Inversion with the source prompt; the
  null-text / negative-prompt embeddings serve both rows (proximal_guidance_forward.py:158).
  negative-prompt+p2p gets `use_inversion_guidance=True` but `proximal=None`, which makes it
  plain negative-prompt inversion (proximal_guidance_forward.py:38, :75, :77).
PnP (run_editing_pnp.py): 50-step DDIM inversion with the source prompt (:423-425, :449-451),
  features 0.8 and q/k 0.5 of the steps (:386-387), the source row conditioned on "" (:384),
  the negative prompt "ugly, blurry, black, low res, unrealistic" as unconditional (:383).
  direct+pnp: the source row takes the inversion latents (:453). ddim+pnp: the source row takes
  the DDIM *reconstruction* (source prompt, w = 1) of the inverted noise, reversed (:153-155),
  read one step late: at step i the source row and the start latent are the reconstruction
  after step i (:381, :396), not before it.
MasaCtrl (run_editing_masactrl.py:93, :134, :224-225): start_step 4, start_layer 10, source
  prompt "" for the inversion and the source row.

mode "faithful" keeps all of that; "corrected" changes three decisions the scripts make by
accident: P2P replaces words when the prompts have the same number of words (refine otherwise),
blend words match ignoring case and punctuation (the official match is exact, and a missing word
silently blends nothing), and ddim+pnp's source row is read at the step it belongs to.
"""
import os

import torch

INVERSIONS = ("ddim", "null-text", "negative-prompt", "direct")
EDITORS = ("p2p", "pnp", "masactrl")
# The eight runs of PIE-Bench's inversion table (PnP and MasaCtrl were run with ddim and direct only).
METHODS = ("ddim+p2p", "null-text+p2p", "negative-prompt+p2p", "direct+p2p",
           "ddim+pnp", "direct+pnp", "ddim+masactrl", "direct+masactrl")
MODES = ("faithful", "corrected")
CROSS, SELF, BLEND_WEIGHT = 0.4, 0.6, 2.0  # run_editing_p2p.py:125-131
PNP_NEGATIVE = "ugly, blurry, black, low res, unrealistic"  # run_editing_pnp.py:383
MASA_STEP, MASA_LAYER = 4, 10  # run_editing_masactrl.py:224-225 (10 of SD's 16 self-attention layers)


def masa_layer(sd):
    """The official start_layer 10 on SD's 16-layer topology; on another (sdlens-tiny: 11 layers) MasaCtrl's
    default, the same decoder layers (its two finest resolutions)."""
    return MASA_LAYER if len(sd.unet.hook_names(kind="self_attention", point="out")) == 16 else None


def check_methods(methods):
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r}; valid methods: {','.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"a method is listed twice: {','.join(methods)}")
    return list(methods)


def word_indices(prompt, word, exact):
    """Indices of `word` among the prompt's words: exact as the official get_word_inds, else
    ignoring case and surrounding punctuation. Empty when absent (officially: blends nothing)."""
    key = word if exact else word.strip(".,!?;:").lower()
    return [i for i, w in enumerate(prompt.split()) if (w if exact else w.strip(".,!?;:").lower()) == key]


def latents(sd, image, prompt, steps, cache):
    """DDIM inversion at w = 1 with `prompt`, shared by every method of one item."""
    from ..inversion import ddim_latents
    if ("zs", prompt) not in cache:
        cache["zs", prompt] = ddim_latents(sd, image, prompt, steps)
    return cache["zs", prompt]


def inversion(sd, image, prompt, method, steps, guidance, cache):
    """`invert_image`, with the DDIM latents and null-text embeddings cached across editors."""
    from ..inversion import Inversion, null_text
    zs = latents(sd, image, prompt, steps, cache)
    if method == "null-text":
        if ("null-text", prompt) not in cache:
            with torch.enable_grad():
                cache["null-text", prompt] = null_text(sd, zs, prompt, guidance)
        return Inversion(zs, prompt, method, uncond=cache["null-text", prompt])
    if method == "negative-prompt":
        # the image's size: SDXL's context carries it (its size ids)
        return Inversion(zs, prompt, method, uncond=[sd.encode_prompt([prompt], sd.image_size(zs[0]))] * steps)
    return Inversion(zs, prompt, method, direct=method == "direct")


def edit_p2p(sd, src, tgt, blended, inv, steps, guidance, faithful):
    from ..editing import LocalBlend, PromptToPrompt
    mode = "refine" if faithful or len(src.split()) != len(tgt.split()) else "replace"
    blend = equalize = None
    if len(blended) >= 2:  # the script: `if len(blended_word)`, then words [0] and [1]
        s, t = word_indices(src, blended[0], faithful), word_indices(tgt, blended[1], faithful)
        blend = LocalBlend([s, t])
        equalize = {i: BLEND_WEIGHT for i in t} or None
    editor = PromptToPrompt(sd, src, [tgt], mode=mode, cross_replace_steps=CROSS, self_replace_steps=SELF,
                            equalize=equalize, blend=blend, steps=steps)
    return editor.run(guidance_scale=guidance, inversion=inv, progress=False).pil()[1]


def reconstruction(sd, zs, prompt, steps):
    """[x after step 0, ..., x after step N-1] of DDIM sampling from zs[-1] with `prompt` at w = 1."""
    from ..schedulers import sample
    out = []
    with torch.no_grad():
        sample(sd.denoiser(sd.encode_prompt([prompt], sd.image_size(zs[0])), 1.0, steps), zs[-1], sd.scheduler, steps,
               callback=lambda i, t, x: out.append(x))
    return out


def edit_pnp(sd, src, tgt, zs, inv_method, steps, guidance, faithful):
    from ..editing.pnp import translate
    if inv_method == "ddim":  # translate reads zs[N - i] at step i and starts from zs[N]
        rec = reconstruction(sd, zs, src, steps)
        zs = [zs[0]] + rec[::-1] if faithful else rec[::-1] + [zs[-1]]
    res = translate(sd, None, tgt, negative_prompt=PNP_NEGATIVE, alpha=0.0, latents=zs, guidance_scale=guidance,
                    steps=steps, progress=False)
    return res.pil()[0]


def edit_masactrl(sd, tgt, image, inv_method, steps, guidance, cache):
    from ..inversion import Inversion
    from ..editing.masactrl import MasaCtrl  # lazily: written beside this module
    zs = latents(sd, image, "", steps, cache)
    inv = Inversion(zs, "", inv_method, direct=inv_method == "direct")
    editor = MasaCtrl(sd, "", tgt, steps=steps, start_step=MASA_STEP, start_layer=masa_layer(sd))
    return editor.run(guidance_scale=guidance, inversion=inv, progress=False).pil()[1]


def edit_item(sd, item, image, method, steps=50, guidance=7.5, mode="faithful", cache=None):
    """Edit `image` (PIL at the model's size) of a PIE item by `method` -> the edited PIL image.

    `cache`: a dict kept across the methods of one item, so that they share inversions."""
    check_methods([method])
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    cache = {} if cache is None else cache
    inv_method, editor = method.split("+")
    src, tgt, faithful = item.original_prompt, item.editing_prompt, mode == "faithful"
    if editor == "p2p":
        inv = inversion(sd, image, src, inv_method, steps, guidance, cache)
        return edit_p2p(sd, src, tgt, item.blended_word or (), inv, steps, guidance, faithful)
    if editor == "pnp":
        return edit_pnp(sd, src, tgt, latents(sd, image, src, steps, cache), inv_method, steps, guidance, faithful)
    return edit_masactrl(sd, tgt, image, inv_method, steps, guidance, cache)


def run_bench(sd, data, items, methods, metrics, done=None, on_row=None, rank=0, world=1, progress=True, steps=50,
              guidance=7.5, mode="faithful"):
    """Rows {item, method, metric...} of this rank's PIE items (`pie.Item`s of the folder `data`) (index i with i % world == rank), in item
    order, then method order. `done`: {(item id, method): row} already computed, returned as they
    are. `on_row(row)` is called as each new row is made. `metrics(source, edited, item)` -> {column: number}."""
    methods, done = check_methods(methods), done or {}
    mine = [it for i, it in enumerate(items) if i % world == rank]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        # leave=False and closed on any exit (finally below): an error is printed on a line of its own
        bar = tqdm(total=len(mine), desc="edit-bench" + (f" rank {rank}/{world}" if world > 1 else ""), unit="image",
                   leave=False)
    try:
        return _run_items(sd, data, mine, methods, done, on_row, metrics, bar, steps, guidance, mode)
    finally:
        if bar is not None:
            bar.close()


def _run_items(sd, data, mine, methods, done, on_row, metrics, bar, steps, guidance, mode):
    from ..inversion import load_image
    rows = []
    for item in mine:
        todo = [m for m in methods if (item.key, m) not in done]
        path = os.path.join(data, "annotation_images", item.image_path)
        image, cache = (load_image(path, sd=sd), {}) if todo else (None, None)  # centre-cropped, resized
        for m in methods:
            if m not in todo:
                rows.append(done[item.key, m])
                continue
            if bar is not None:
                bar.set_postfix_str(f"{item.key} {m}")
            edited = edit_item(sd, item, image, m, steps, guidance, mode, cache)
            row = {"item": item.key, "method": m, **{k: float(v) for k, v in metrics(image, edited, item).items()}}
            rows.append(row)
            if on_row is not None:
                on_row(row)
        if bar is not None:
            bar.update()
    return rows


# PIE-Bench's table (evaluate.py's metric names), in its column order, with its scales.
TABLE = (("structure_distance", "Structure x1e3", 1e3), ("psnr_unedit_part", "PSNR", 1.0),
         ("lpips_unedit_part", "LPIPS x1e3", 1e3), ("mse_unedit_part", "MSE x1e4", 1e4),
         ("ssim_unedit_part", "SSIM x1e2", 1e2), ("clip_similarity_target_image", "CLIP whole", 1.0),
         ("clip_similarity_target_image_edit_part", "CLIP edited", 1.0),
         ("structure_iou", "Structure IoU", 1.0), ("edit_success", "Success %", 1e2))  # the last two: TinyMetrics


def table(rows, methods):
    """Mean per method over items of each PIE column the rows have; NaN skipped and counted."""
    cols = [c for c in TABLE if any(c[0] in r for r in rows)]
    head = ["method"] + [h for _, h, _ in cols]
    lines, nans = [], 0
    for m in methods:
        cells = [m]
        for name, _, scale in cols:
            vals = [float(r[name]) for r in rows if r["method"] == m and name in r]
            ok = [v for v in vals if v == v]
            nans += len(vals) - len(ok)
            cells.append(f"{scale * sum(ok) / len(ok):.2f}" if ok else "nan")
        lines.append(cells)
    width = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, width)))
    n = len({r["item"] for r in rows})
    note = f"{n} images; means over images" + (f", {nans} NaN values skipped" if nans else "")
    return "\n".join([fmt(head)] + [fmt(c) for c in lines] + [note])


def csv_text(rows):
    from ..outputs import csv_text as write_csv
    return write_csv(rows, None if rows else ["item", "method"])
