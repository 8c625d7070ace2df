"""PIE-Bench's on-disk format (Ju et al. 2024, "PnP Inversion"; github.com/cure-lab/PnPInversion).

    ROOT/mapping_file.json                 {key: entry, ...}, read in the file's key order
    ROOT/annotation_images/<image_path>    the source image (PIE-Bench: 512x512 .jpg)

An entry (README.md:131-141; read by run_editing_p2p.py:99-112 and evaluation/evaluate.py:246-258):
    image_path           str, relative to annotation_images/ ("0_random_140/000000000000.jpg")
    original_prompt      str, words that differ from editing_prompt in [] (brackets stripped on read)
    editing_prompt       str, edited words in []
    editing_instruction  str, an InstructPix2Pix-style instruction
    editing_type_id      str "0".."9" (the runners compare it with strings: run_editing_p2p.py:104)
    blended_word         str "source_word target_word", or "" (run_editing_p2p.py:111 splits on " ")
    mask                 flat list [start, length, start, length, ...]: runs of 1s in the row-major
                         512x512 grid, 1 = the region to edit (README.md:140); `mask_decode`
                         (evaluate.py:9-25) clips a run at the end and forces the 1-pixel border to 1.
The background metrics use 1 - mask (evaluate.py:40-59).
"""
import json
import os
import shutil
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from ..outputs import undo_moves

GRID = (512, 512)  # mask_decode's default image_shape (evaluate.py:9)
FIELDS = ("image_path", "original_prompt", "editing_prompt", "editing_instruction", "editing_type_id",
          "blended_word", "mask")
TYPES = {"0": "random", "1": "change object", "2": "add object", "3": "delete object",
         "4": "change attribute content", "5": "change attribute pose", "6": "change attribute color",
         "7": "change attribute material", "8": "change background", "9": "change style"}  # README.md:109-118


@dataclass
class Item:
    key: str
    image_path: str  # relative to ROOT/annotation_images
    original_prompt: str  # brackets stripped
    editing_prompt: str  # brackets stripped
    edited_words: Tuple[str, ...]  # the words inside [] in the raw editing_prompt
    editing_instruction: str
    editing_type_id: str
    blended_word: Optional[Tuple[str, ...]]  # None where the file has ""
    mask: np.ndarray  # bool [512, 512], decoded exactly as mask_decode
    raw: dict  # the entry as it is in mapping_file.json


def strip_brackets(prompt):
    return prompt.replace("[", "").replace("]", "")  # run_editing_p2p.py:107-108, evaluate.py:255-256


def bracketed(prompt):
    """The words inside [] ("a [red] [big] cat" -> ("red", "big"))."""
    out, rest = [], prompt
    while "[" in rest and "]" in rest.split("[", 1)[1]:
        inside, rest = rest.split("[", 1)[1].split("]", 1)
        out.extend(inside.split())
    return tuple(out)


def decode_mask(rle, shape=GRID):
    """mask_decode (evaluate.py:9-25), vectorised: runs clipped at the end, border forced to 1."""
    n = shape[0] * shape[1]
    flat = np.zeros(n + 1, dtype=np.int32)  # a difference array: +1 at a run's start, -1 after its end
    starts = np.asarray(rle[0::2], dtype=np.int64)
    ends = np.minimum(starts + np.asarray(rle[1::2], dtype=np.int64), n)
    keep = starts < ends  # mask_decode's range() of a non-positive splice_len does nothing
    np.add.at(flat, starts[keep], 1)
    np.add.at(flat, ends[keep], -1)
    mask = (np.cumsum(flat[:n]) > 0).reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True  # "to avoid annotation errors in boundary"
    return mask


def encode_mask(mask):
    """Runs of True in the row-major flattened mask -> [start, length, ...] (plain ints, for json).
    decode_mask(encode_mask(m)) == m with the border set to 1."""
    flat = np.concatenate([[False], np.asarray(mask, dtype=bool).ravel(), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])  # alternating run starts and ends
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


def mask_at(mask, size):
    """A 512x512 mask on an image of `size` (h, w) pixels: a pixel is marked if any of the grid cells
    it covers is (max-pooling; exact where the mask was nearest-upsampled from that size, and the
    forced border becomes the image's 1-pixel border). Identity at 512x512."""
    h, w = size
    gh, gw = mask.shape
    if gh % h or gw % w:
        raise ValueError(f"mask_at: image size {h}x{w} must divide the mask grid {gh}x{gw}")
    return mask.reshape(h, gh // h, w, gw // w).any(axis=(1, 3))


def _bad(path, key, what):
    return ValueError(f"{path}: entry {key!r}: {what}")


def parse_entry(key, raw, path="mapping_file.json", root=None):
    """One entry -> Item, or a one-line ValueError naming the file and key."""
    if not isinstance(raw, dict):
        raise _bad(path, key, f"is a {type(raw).__name__}, not an object with fields {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if f not in raw]
    if missing:
        raise _bad(path, key, f"missing field(s) {', '.join(missing)}")
    for f in FIELDS[:-1]:
        if not isinstance(raw[f], str):
            raise _bad(path, key, f"{f} must be a string, got {type(raw[f]).__name__} {raw[f]!r}")
    if raw["editing_type_id"] not in TYPES:
        raise _bad(path, key, f"editing_type_id must be one of \"0\"..\"9\", got {raw['editing_type_id']!r}")
    rle, cells = raw["mask"], GRID[0] * GRID[1]
    if not isinstance(rle, list) or len(rle) % 2 or not all(type(v) is int and 0 <= v <= cells for v in rle):
        raise _bad(path, key, f"mask must be a flat list of integers from 0 to {cells} [start, length, ...] "
                              "of even length (PIE-Bench's run-length encoding on its 512x512 grid)")
    image = raw["image_path"]
    parts = image.replace("\\", "/").split("/")
    if not image or os.path.isabs(image) or ".." in parts or image.startswith("~"):
        raise _bad(path, key, f"image_path {image!r} leaves annotation_images/; give a path inside it")
    if root is not None:
        full = os.path.join(root, "annotation_images", image)
        if not os.path.isfile(full):
            raise _bad(path, key, f"image annotation_images/{image} not found under {root}")
        try:  # decoded whole, before the model loads: a file cut short would fail mid-run otherwise, on one
            with Image.open(full) as im:  # torchrun rank (~3 ms per 512x512 JPEG here)
                im.load()
        except (OSError, ValueError) as e:
            raise _bad(path, key, f"annotation_images/{image} is not a readable image ({type(e).__name__})") from None
    words = tuple(raw["blended_word"].split(" ")) if raw["blended_word"] != "" else None  # run_editing_p2p.py:111
    return Item(key=key, image_path=raw["image_path"], original_prompt=strip_brackets(raw["original_prompt"]),
                editing_prompt=strip_brackets(raw["editing_prompt"]), edited_words=bracketed(raw["editing_prompt"]),
                editing_instruction=raw["editing_instruction"], editing_type_id=raw["editing_type_id"],
                blended_word=words, mask=decode_mask(rle), raw=raw)


def make_item(key, image_path, original_prompt, editing_prompt, editing_instruction, editing_type_id,
              blended_word, mask):
    """An Item built the way read_benchmark would read it back (`mask`: bool [512, 512])."""
    raw = {"image_path": image_path, "original_prompt": original_prompt, "editing_prompt": editing_prompt,
           "editing_instruction": editing_instruction, "editing_type_id": str(editing_type_id),
           "blended_word": " ".join(blended_word or ()), "mask": encode_mask(mask)}
    return parse_entry(key, raw)


def read_benchmark(root, limit=None) -> List[Item]:
    """All entries of ROOT/mapping_file.json, in the file's key order (the official scripts iterate
    `json.load(f).items()`: run_editing_p2p.py:102, evaluate.py:249), every one checked (fields,
    mask, image present) before any is returned."""
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    path = os.path.join(root, "mapping_file.json")
    if not os.path.isfile(path):
        raise ValueError(f"{root}: no mapping_file.json (a PIE-Bench folder holds mapping_file.json and "
                         f"annotation_images/)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold an object {{key: entry}}, got a {type(data).__name__}")
    items = [parse_entry(k, v, path, root) for k, v in data.items()]
    return items[:limit] if limit is not None else items


def load_image(root, item) -> Image.Image:
    return Image.open(os.path.join(root, "annotation_images", item.image_path)).convert("RGB")


def write_benchmark(root, items_with_images, force=False):
    """Write [(Item, PIL image), ...] as a PIE-Bench folder: mapping_file.json (each Item's `raw`,
    keys in the given order) and annotation_images/<image_path>. An existing non-empty `root` is
    refused unless force=True; then the files this writes replace those at the same paths, and every
    other file in `root` stays (it may be the user's own folder, even the current one).

    All or none: everything is written to a hidden folder first (inside `root` if it exists, else
    beside it). A new `root` is that folder renamed into place; into an existing one the files are
    moved one by one, each file they replace kept aside until all are in, and put back (the new files
    and folders removed) if any move fails."""
    root = os.path.abspath(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"{root} is a file; write_benchmark wants a folder")
    if os.path.isdir(root) and os.listdir(root) and not force:
        raise ValueError(f"{root} exists and is not empty; pass force=True (--force) to replace its PIE-Bench "
                         f"files (mapping_file.json, annotation_images/...) and keep the rest")
    pairs = list(items_with_images)
    keys = [it.key for it, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("write_benchmark: keys must be unique")
    for it, _ in pairs:
        if os.path.isabs(it.image_path) or os.path.normpath(it.image_path).startswith(".."):
            raise ValueError(f"write_benchmark: image_path {it.image_path!r} leaves annotation_images/")
    images = (os.path.normpath(os.path.join("annotation_images", it.image_path)) for it, _ in pairs)
    names = ["mapping_file.json"] + list(dict.fromkeys(images))  # what this writes, each once
    for name in names:  # a folder where a file goes, or a file where a folder goes: refused before writing
        parts = name.split(os.sep)
        for k in range(1, len(parts) + 1):
            path = os.path.join(root, *parts[:k])
            want_dir = k < len(parts)
            if os.path.exists(path) and os.path.isdir(path) != want_dir:
                raise ValueError(f"{path} is a {'file' if want_dir else 'folder'}; PIE-Bench's layout has a "
                                 f"{'folder' if want_dir else 'file'} there")
    exists = os.path.isdir(root)
    parent = root if exists else os.path.dirname(root)  # the renames then stay on one file system
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(root)}.{os.urandom(4).hex()}.tmp")
    try:
        for it, img in pairs:
            out = os.path.join(tmp, "annotation_images", it.image_path)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            img.save(out)  # the format follows the extension (.png: lossless)
        with open(os.path.join(tmp, "mapping_file.json"), "w") as f:
            json.dump({it.key: it.raw for it, _ in pairs}, f)
        if exists:  # never renamed away: it may hold other files, or be the working directory
            _move_in(tmp, root, names)
        else:
            os.replace(tmp, root)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return root


def _move_in(staged, root, names):
    """Move staged/<name> to root/<name> for each name, all or none (see write_benchmark)."""
    made, moved = [], []  # folders created, deepest last; (target, backup or None, staged file)
    try:
        for name in names:
            dst, src = os.path.join(root, name), os.path.join(staged, name)
            missing, d = [], os.path.dirname(dst)
            while not os.path.isdir(d):
                missing.append(d)
                d = os.path.dirname(d)
            for d in reversed(missing):
                os.mkdir(d)
                made.append(d)
            backup = None
            if os.path.lexists(dst):
                backup = os.path.join(staged, ".replaced", name)
                os.makedirs(os.path.dirname(backup), exist_ok=True)
                os.replace(dst, backup)
            moved.append((dst, backup, src))
            os.replace(src, dst)
    except BaseException:
        undo_moves(moved, list(reversed(made)))  # new files out, old files back, new folders removed
        raise
