"""`python -m sdlens demo`: a small gallery from the bundled sdlens-tiny model, in seconds on a CPU.

Writes each image, captioned grids upscaled for viewing, and an index.html that says for each panel
what made it and what to look for, into a new folder (never into an existing one), all of them or,
if anything fails, none. The editing methods add their panels here.
"""
import os
import time

from PIL import Image, ImageDraw

from ..outputs import Staged, Text

PROMPTS = ["a big red circle on the left", "a small blue square at the top", "a yellow star in the center",
           "a big green triangle on the right", "a purple circle at the bottom on a white background",
           "an orange square next to a cyan star", "a pink triangle above a blue circle", "a big cyan star on the left"]


def free_folder(base):
    """`base` if it does not exist, else base-2, base-3, ...: a demo never overwrites earlier output."""
    if not os.path.exists(base):
        return base
    n = 2
    while os.path.exists(f"{base}-{n}"):
        n += 1
    return f"{base}-{n}"


def captioned_grid(images, captions, cols=4, scale=3):
    """Images scaled up `scale` times (nearest: one block = one pixel), each with a caption in a TTF font."""
    from ..visualize import font, wrap
    fnt = font(14)
    w, h = images[0].size
    cw, ch = w * scale + 8, h * scale + 60
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cw, rows * ch), "white")
    d = ImageDraw.Draw(grid)
    for i, (im, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * cw, (i // cols) * ch
        grid.paste(im.resize((w * scale, h * scale), Image.NEAREST), (x, y))
        d.multiline_text((x + 2, y + h * scale + 3), "\n".join(wrap(d, cap, cw - 6, fnt, lines=3)), fill="black", font=fnt,
                         spacing=2)
    return grid


def page(panels, seed, steps, guidance):
    """index.html: one section per panel: its method, prompt, settings, and what to look for."""
    from html import escape
    parts = []
    for p in panels:
        cls = " class=small" if p.get("small") else ""
        imgs = "".join(f'<figure{cls}><img src="{escape(f)}" alt="{escape(c)}"><figcaption>{escape(c)}</figcaption></figure>'
                       for f, c in p["images"])
        parts.append(f"<section><h2>{escape(p['title'])}</h2><p class=meta><b>Method:</b> {escape(p['method'])}<br>"
                     f"<b>Prompt:</b> {escape(p['prompt'])}<br><b>Settings:</b> {escape(p['settings'])}</p>"
                     f"<p class=look><b>Look for:</b> {escape(p['look'])}</p><div class=row>{imgs}</div></section>")
    return Text(f"""<!doctype html><html><head><meta charset="utf-8"><title>sdlens demo</title><style>
body {{ font: 16px/1.45 sans-serif; max-width: 1150px; margin: 1em auto; padding: 0 1em; color: #222 }}
section {{ border-top: 1px solid #ccc; padding: .4em 0 1em }} .meta {{ color: #555 }}
.look {{ background: #f4f1e8; padding: .4em .6em }} .row {{ display: flex; flex-wrap: wrap; gap: 12px }}
figure {{ margin: 0 }} img {{ image-rendering: pixelated; max-width: 100% }} .small img {{ width: 192px }}
figcaption {{ font-size: 14px; max-width: 360px }}</style></head><body>
<h1>sdlens demo</h1><p>Made by <code>python -m sdlens demo</code> with the bundled sdlens-tiny model
(64x64 images, trained on rendered scenes): seed {seed}, {steps} DDIM steps, guidance {guidance}
unless a panel says otherwise. Images are scaled up without smoothing, so each block is one pixel.</p>
{"".join(parts)}</body></html>""")


def summary(folder, seconds):
    """The command's last line but one: what it wrote, counted from the (new) folder."""
    names = os.listdir(folder)
    pngs = sum(n.endswith(".png") for n in names)
    other = ", ".join(sorted(n for n in names if not n.endswith(".png")))
    return f"sdlens demo: wrote {len(names)} files ({pngs} PNG{', ' + other if other else ''}) in {seconds:.0f} s"


# (source, target, mode, re-weighting): the Prompt-to-Prompt panels
EDITS = [("a big red circle on the left", "a big blue circle on the left", "replace", None),
         ("a big yellow star in the center", "a big yellow square in the center", "replace", None),
         ("a small green triangle at the top", "a small green triangle at the top on a black background", "refine", None),
         ("a big purple square next to a yellow circle", "a big purple square next to a yellow circle", "reweight",
          {"yellow": -2.0})]  # -1 leaves this model's circle yellow; -2 turns it purple


def run(sd, out, seed=0, steps=50, guidance=7.5):
    if os.path.exists(out):
        raise ValueError(f"{out} exists; the demo writes a new folder (see free_folder)")
    with Staged(out) as staged:
        return _run(sd, staged.save, seed, steps, guidance)


def _run(sd, save, seed, steps, guidance):
    import random

    from ..editing import PromptToPrompt
    from ..editing.attention_maps import word_maps
    from ..features.pca import collect, pca_rgb
    from ..editing.pnp import inversion_latents, translate
    from ..visualize import attention_grid, self_attention_components
    from ..pipeline import to_pil
    from .scenes import render, scene_from
    from tqdm.auto import tqdm
    t0 = time.time()
    cfg = f"seed {seed}, {steps} steps, guidance {guidance}"
    panels = []
    bar = tqdm(total=8, desc="sdlens demo (generate, P2P, PnP, MasaCtrl, FreeU/PAG/StyleAligned/A&E, PCA, "
               "correspondence, probes)", leave=False)  # one bar for the whole gallery
    images = sd.generate(PROMPTS, steps=steps, guidance_scale=guidance, seed=seed, progress=False)
    for i, im in enumerate(images):
        save(im, f"generate_{i:02d}.png")
    save(captioned_grid(images, PROMPTS), "generate_grid.png")
    panels.append(dict(title="Text to image", method="sd.generate (DDIM, classifier-free guidance)",
                       prompt="one per image, below it", settings=cfg + f"; all {len(PROMPTS)} in one grid: generate_grid.png",
                       look="each image should show its prompt's colour, shape and place; stars are this model's "
                            "weak shape (the VAE blurs small ones into blobs).",
                       images=[(f"generate_{i:02d}.png", p) for i, p in enumerate(PROMPTS)], small=True))

    bar.update()
    pairs, caps = [], []
    for src, tgt, mode, eq in EDITS:
        editor = PromptToPrompt(sd, src, [tgt], mode=mode, equalize=eq, steps=steps)
        res = editor.run(guidance_scale=guidance, seed=seed, progress=False)
        a, b = res.pil()
        pairs += [a, b]
        caps += [src, f"{mode}: {tgt}" if not eq else f"reweight {eq}"]
        if len(pairs) == 2:  # the word swap: its per-word attention, and the source's self-attention
            # 8x8: sdlens-tiny's 16x16 layers attend almost uniformly (docs/editing.md, attention maps; attention_store.object_map_size)
            side = res.store.largest(limit=8)
            maps = res.store.aggregate(side)
            for row, (prompt, name) in enumerate([(src, "p2p_attention_source.png"), (tgt, "p2p_attention_edit.png")]):
                save(attention_grid(word_maps(maps[row], sd.tokenizer, prompt), image=res.images[row], title=prompt), name)
            side = res.store.largest()
            save(self_attention_components(res.store.aggregate(side, kind="self_attention")[0]), "p2p_self_attention.png")
            swap = dict(src=src, tgt=tgt, side=side)
    save(captioned_grid(pairs, caps, cols=2), "p2p_grid.png")
    p2p = "PromptToPrompt (Hertz et al. 2023): source and edit sampled together from one noise"
    panels.append(dict(title="Prompt-to-Prompt edits", method=p2p, prompt="left: source; right: the edit",
                       settings=cfg + "; cross_replace_steps 0.8, self_replace_steps 0.4",
                       look="each pair keeps its layout and changes only what the edit names: the circle turns blue, "
                            "the star becomes a square, the background turns black, and re-weighting 'yellow' by -2 "
                            "takes the yellow out of the circle.", images=[("p2p_grid.png", "source | edit, per row")]))
    panels.append(dict(title="Where each word attends (word swap)", method=p2p + "; cross-attention per word",
                       prompt=f"{swap['src']} -> {swap['tgt']}", settings=cfg + "; 8x8 maps averaged over steps, heads and "
                       "layers, each tile divided by its own maximum (official show_cross_attention), over the image in grey",
                       look="'red' and 'circle' are bright on the circle and dark elsewhere; in the edit 'blue' is bright "
                            "where 'red' was, because the edit copied the source's maps. Words like 'a' spread out.",
                       images=[("p2p_attention_source.png", "source"), ("p2p_attention_edit.png", "edit")]))
    panels.append(dict(title="Self-attention components", method=p2p + "; SVD of the source's self-attention "
                       "(official show_self_attention_comp)", prompt=swap["src"],
                       settings=cfg + f"; {swap['side']}x{swap['side']} maps, top 6 components, each scaled to its range",
                       look="the circle's outline stands out in the first components (the map's regions that attend "
                            "alike); on this small model the later ones are mostly noise.",
                       images=[("p2p_self_attention.png", "components 1-6")]))

    bar.update()
    # Plug-and-Play on a rendered ("real") scene, and the shared-basis PCA of its decoder features
    scenes = [scene_from(s, c, "big", p, "gray", "plain", seed=i) for i, (s, c, p) in
              enumerate([("star", "red", "left"), ("circle", "blue", "right"), ("square", "green", "top"),
                         ("triangle", "orange", "center")])]
    reals = [render(sc, random.Random(i)) for i, sc in enumerate(scenes)]
    zs = inversion_latents(sd, reals[0], steps=steps)
    target = "a big blue star on the left"
    pnp = translate(sd, None, target, latents=zs, steps=steps, guidance_scale=guidance, progress=False)
    save(captioned_grid([reals[0], pnp.pil()[0]], [scenes[0].caption, f"pnp: {target}"], cols=2), "pnp_grid.png")
    panels.append(dict(title="Plug-and-Play translation", method="translate (Tumanyan et al. 2023) of a rendered scene",
                       prompt=target, settings=f"{steps}-step DDIM inversion, {cfg}; features injected for 0.8 of the "
                       "steps, self-attention for 0.5", look="the star keeps the rendered scene's place and outline while "
                       "its colour follows the prompt.", images=[("pnp_grid.png", "guidance image | translation")]))

    bar.update()
    k = steps // 2
    t = zs_timestep(sd, steps, k)
    info = sd.unet.hook_info
    full = [n for n in sd.unet.hook_names(place="up", kind="resblock", point="out") if info(n).level == 0][0]
    layers = [full, "output_blocks.4.0.hook_out"]  # a full-resolution layer, and PnP's injection layer
    feats = collect(sd, [inversion_latents(sd, im, steps=steps)[k] for im in reals], t, layers)
    tiles, caps = list(reals), [sc.caption for sc in scenes]
    for n in layers:
        h, w = feats[n][0].shape[-2:]
        tiles += [to_pil(rgb[None])[0].resize(reals[0].size, Image.NEAREST) for rgb in pca_rgb(feats[n])]
        caps += [f"PCA {info(n).module} ({h}x{w})"] * len(reals)
    save(captioned_grid(tiles, caps), "features_pca.png")
    panels.append(dict(title="Decoder features, PCA", method="features.collect + pca_rgb: the top 3 principal components "
                       "as RGB, on one basis shared by the four images", prompt='"" (the inverted latents of the scenes)',
                       settings=f"inversion latent z_{k} of {steps}, timestep {t}; rows: the scenes, then "
                       f"{info(full).module} ({feats[full][0].shape[-1]}x{feats[full][0].shape[-1]}), then "
                       "output_blocks.4.0 (PnP's injection layer, 8x8 on this model), scaled up without smoothing",
                       look="the background takes one colour in all four scenes (one shared basis) and each shape "
                            "stands out from it at its place, sharper at 16x16 than at 8x8.",
                       images=[("features_pca.png", "scenes, then their features")]))
    bar.update()
    panels.append(masactrl_panel(sd, save, steps))
    bar.update()
    from .demo_methods import explore_panel, panels as method_panels
    panels += method_panels(sd, save, seed, steps, guidance)
    panels.append(explore_panel(sd, save, seed, guidance))
    bar.update()
    panels.append(correspondence_panel(sd, save))
    bar.update()
    panels.append(sweep_panel(sd, save, seed))
    bar.update()
    bar.close()
    save(page(panels, seed, steps, guidance), "index.html")
    return time.time() - t0


# sdlens-tiny's best correspondence layer and t, chosen on pairs 0-31 (bench/correspondence_on_tiny.py) and
# checked on held-out pairs by tests/test_correspond.py. DIFT's own default, paper_layer("dift", 1), is
# output_blocks.5.hook_out here (PCK 0.33 against 0.41 on the same pairs).
TINY_CORRESPONDENCE = ("output_blocks.3.0.hook_out", 101)


def masactrl_panel(sd, save, steps):
    from ..editing.masactrl import DEMO, demo
    images = demo(sd, steps=steps)
    src, tgt = DEMO["source_prompt"], DEMO["target_prompt"]
    save(captioned_grid(images, [src, f"MasaCtrl: {tgt}", f"plain run: {tgt}"], cols=3), "masactrl.png")
    return dict(title="MasaCtrl: mutual self-attention", method="MasaCtrl (Cao et al. 2023): from step 4, the target's "
                "queries in the decoder's finest self-attention layers read the source's keys and values",
                prompt=f"{src} -> {tgt}", settings=f"seed {DEMO['seed']}, {steps} steps, guidance 7.5, start_step 4, "
                "the decoder's two finest resolutions (the official start_layer 10 of SD's 16)",
                look="the edit moves the triangle to the right and keeps the source's background, which the plain run "
                     "of the same prompt from the same noise does not. It does NOT keep the colour: on this model the "
                     "colour comes from the text through cross-attention, which MasaCtrl leaves to the target prompt "
                     "(0 of 10 seeded pairs kept it; tests/test_masactrl.py).",
                images=[("masactrl.png", "source | MasaCtrl | plain run")])


def correspondence_panel(sd, save):
    from ..features import correspond, draw_matches, pck
    from .pairs import make_pairs
    name, t = TINY_CORRESPONDENCE
    tiles, caps = [], []
    for p in make_pairs(range(1000, 1004)):  # held-out pairs, one per shape
        found = correspond(sd, p.source, p.src_kps, p.target, name=name, t=t, ensemble=8)
        tiles.append(draw_matches(p.source, p.target, p.src_kps, found, min_height=128))
        caps.append(f"{p.shape}: PCK@0.1 {pck(found, p.trg_kps, p.bbox_size):.2f} ({len(p.src_kps)} points)")
    save(captioned_grid(tiles, caps, cols=2, scale=1), "correspondence.png")
    return dict(title="Semantic correspondence (DIFT)", method="features.correspond (Tang et al. 2023): each source "
                "point goes to the target pixel whose diffusion feature is most similar (cosine)",
                prompt='"" (no text: the features come from the images alone)',
                settings=f"hook {name} at t = {t}, 8 noise draws averaged; points: the shape's centre and vertices, "
                         "known from the renderer; PCK@0.1 counts a match within 10% of the target's box side",
                look="the shape moved, changed colour and background, yet most lines end on or next to the target's "
                     "shape; which corner is which is often wrong on this small model. Over 24 held-out pairs "
                     "this model scores about 0.37, raw pixels 0.03 and the same UNet untrained 0.16 "
                     "(tests/test_correspond.py).", images=[("correspondence.png", "source | target, per pair")])


def sweep_panel(sd, save, seed):
    from ..features.probe import probe_sweep, sweep_heatmap
    ts, n = (0, 101, 501, 801), 12
    rows = probe_sweep(sd, ts=ts, kinds=("resblock", "block", "cross_probs"), n_train=n, n_test=n, seed=seed)
    save(sweep_heatmap(rows, f"segmentation probe mIoU, {n} train / {n} held-out scenes"), "probe_sweep.png")
    best = max((r for r in rows if r["t"] is not None), key=lambda r: r["miou"])
    return dict(title="Which layer knows the shapes? A linear probe per layer and timestep",
                method="features.probe_sweep: a ridge-regression probe per hook point and t predicts each pixel's class "
                       "(background, circle, square, triangle, star) from that layer's features",
                prompt='""', settings=f"{n} training and {n} held-out rendered scenes, t in {ts}, ResBlock and block "
                "outputs and cross-attention maps; `python -m sdlens features sweep` runs the full sweep",
                look=f"the best cell is {best['hook']} at t = {best['t']} (mIoU {best['miou']:.2f}): the decoder's "
                     "8x8 level is brightest and every layer fades at t = 801, where the noise hides the shape. "
                     "The baseline rows (raw pixels, VAE latents) stay dark.",
                images=[("probe_sweep.png", "hooks x timesteps, mIoU")])


def zs_timestep(sd, steps, k):
    """The timestep of the inversion latent z_k (k inversion steps from the clean latent)."""
    from ..schedulers import timesteps
    return list(reversed(timesteps(sd.scheduler, steps)))[max(k - 1, 0)]
