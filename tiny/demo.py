"""`python -m sdlens demo`: a small gallery from the bundled sdlens-tiny model, in seconds on a CPU.

Writes each image, and a captioned grid upscaled for viewing, into a new folder (never into an
existing one) and prints its path. The editing methods add their panels here.
"""
import os
import time

from PIL import Image, ImageDraw

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
    w, h = images[0].size
    cw, ch = w * scale, h * scale + 28
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cw, rows * ch), "white")
    d = ImageDraw.Draw(grid)
    for i, (im, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * cw, (i // cols) * ch
        grid.paste(im.resize((w * scale, h * scale), Image.NEAREST), (x, y))
        words, lines = cap.split(), [""]
        for word in words:  # wrap to the cell width (about 6 px per character)
            if len(lines[-1]) + len(word) + 1 > cw // 6:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        d.multiline_text((x + 2, y + h * scale + 1), "\n".join(lines[:2]), fill="black", spacing=1)
    return grid


def run(sd, out, seed=0, steps=50, guidance=7.5):
    from ..__main__ import save_image_atomic
    os.makedirs(out)
    t0 = time.time()
    images = sd.generate(PROMPTS, steps=steps, guidance_scale=guidance, seed=seed)
    for i, im in enumerate(images):
        save_image_atomic(im, os.path.join(out, f"generate_{i:02d}.png"))
    save_image_atomic(captioned_grid(images, PROMPTS), os.path.join(out, "generate_grid.png"))
    return time.time() - t0
