"""PIE-Bench's format (editbench/pie.py) against hand-worked values and the official decoder's
behaviour (cure-lab/PnPInversion evaluation/evaluate.py:9-25, run_editing_p2p.py:99-112)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from sdlens.editbench.pie import (bracketed, decode_mask, encode_mask, load_image, make_item, mask_at, read_benchmark,
                                  write_benchmark)


def official_decode(rle, shape=(512, 512)):
    """The official algorithm, element by element: for each (start, length) set
    min(length, total - start) cells from start on; reshape row-major; set the 4 border lines."""
    total = shape[0] * shape[1]
    m = np.zeros(total)
    for i in range(0, len(rle), 2):
        for j in range(min(rle[i + 1], total - rle[i])):
            m[rle[i] + j] = 1
    m = m.reshape(shape)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = 1
    return m


def test_rectangle_rle_by_hand():
    # rows 100..109, columns 200..249: one run of 50 per row, start = row * 512 + 200
    rle = [v for r in range(100, 110) for v in (r * 512 + 200, 50)]
    m = decode_mask(rle)
    assert m.shape == (512, 512) and m.dtype == np.bool_
    want = np.zeros((512, 512), bool)
    want[100:110, 200:250] = True
    want[0, :] = want[-1, :] = want[:, 0] = want[:, -1] = True
    assert (m == want).all()
    assert m.sum() == 500 + 4 * 511  # the rectangle and the 2044 border pixels


def test_border_forced_on_empty_mask():
    m = decode_mask([])
    assert m.sum() == 4 * 511 and m[0].all() and m[-1].all() and m[:, 0].all() and m[:, -1].all()
    assert not m[1:-1, 1:-1].any()


def test_run_crossing_rows_and_past_the_end():
    m = decode_mask([512 * 3 + 510, 5])  # cols 510, 511 of row 3, cols 0..2 of row 4 (row-major)
    assert m[3, 510] and m[3, 511] and m[4, 0] and m[4, 1] and m[4, 2] and not m[4, 3] and not m[3, 509]
    tail = decode_mask([512 * 512 - 3, 100, 512 * 512 + 7, 4])  # clipped as min(); a start past the end: nothing
    assert (tail == official_decode([512 * 512 - 3, 100, 512 * 512 + 7, 4])).all()
    rng = np.random.default_rng(0)
    for _ in range(5):  # random overlapping runs, unsorted
        rle = [int(v) for s, n in zip(rng.integers(0, 512 * 512, 30), rng.integers(0, 3000, 30)) for v in (s, n)]
        assert (decode_mask(rle) == official_decode(rle)).all()
    assert (decode_mask([0, 6], (4, 4)) == official_decode([0, 6], (4, 4))).all()


def test_encode_decode_round_trip():
    rng = np.random.default_rng(1)
    m = rng.random((512, 512)) < 0.3
    m[200:300, 100:400] = True
    with_border = m.copy()
    with_border[0, :] = with_border[-1, :] = with_border[:, 0] = with_border[:, -1] = True
    rle = encode_mask(m)
    assert all(type(v) is int for v in rle) and len(rle) % 2 == 0
    assert (decode_mask(rle) == with_border).all()
    assert encode_mask(np.zeros((4, 4), bool)) == [] and encode_mask(np.ones((2, 2), bool)) == [0, 4]
    assert encode_mask(np.array([[0, 1, 1], [1, 0, 1]], bool)) == [1, 3, 5, 1]


def test_mask_at_nearest_upsampled():
    small = np.zeros((64, 64), bool)
    small[10:20, 30:41] = True
    big = decode_mask(encode_mask(small.repeat(8, 0).repeat(8, 1)))
    got = mask_at(big, (64, 64))
    ring = np.zeros((64, 64), bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    assert (got == (small | ring)).all()
    assert (mask_at(big, (512, 512)) == big).all()
    with pytest.raises(ValueError, match="divide"):
        mask_at(big, (100, 100))


def test_brackets_and_blended_word(tmp_path):
    it = make_item("000", "a/x.png", "a [red] circle", "a [blue] [small] circle", "make it blue", "6",
                   ("circle", "circle"), np.zeros((512, 512), bool))
    assert it.original_prompt == "a red circle" and it.editing_prompt == "a blue small circle"
    assert it.edited_words == ("blue", "small") and bracketed("no edit") == ()
    assert it.blended_word == ("circle", "circle") and it.raw["blended_word"] == "circle circle"
    assert it.raw["editing_type_id"] == "6" and it.raw["editing_prompt"] == "a [blue] [small] circle"
    style = make_item("001", "a/y.png", "a photo", "a [watercolor] painting", "", "9", None, np.zeros((512, 512), bool))
    assert style.blended_word is None and style.raw["blended_word"] == ""


def write_set(root, n=3):
    rng = np.random.default_rng(2)
    items = []
    for i in range(n):
        m = np.zeros((512, 512), bool)
        m[50 * i + 10:50 * i + 60, 20:90] = True
        it = make_item(f"{9 - i:03d}", f"{i}_t/{i}.png", "a [red] circle", "a [blue] circle", "blue", str(i),
                       ("circle", "circle"), m)
        items.append((it, Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))))
    write_benchmark(root, items)
    return items


def test_write_read_layout(tmp_path):
    root = tmp_path / "bench"
    items = write_set(root)
    assert sorted(os.listdir(root)) == ["annotation_images", "mapping_file.json"]
    raw = json.load(open(root / "mapping_file.json"))
    assert list(raw) == ["009", "008", "007"]  # the given order, not sorted
    for entry in raw.values():
        assert set(entry) == {"image_path", "original_prompt", "editing_prompt", "editing_instruction",
                              "editing_type_id", "blended_word", "mask"}
        assert isinstance(entry["editing_type_id"], str) and isinstance(entry["blended_word"], str)
    back = read_benchmark(root)
    assert [b.key for b in back] == ["009", "008", "007"]
    for (it, img), b in zip(items, back):
        assert (b.mask == it.mask).all() and b.raw == it.raw
        assert (np.asarray(load_image(root, b)) == np.asarray(img)).all()  # PNG: lossless
    assert [b.key for b in read_benchmark(root, limit=2)] == ["009", "008"]
    with pytest.raises(ValueError, match="not empty"):
        write_set(root)
    write_benchmark(root, items[:1], force=True)
    assert len(read_benchmark(root)) == 1
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary left


@pytest.mark.parametrize("edit, what", [
    (lambda e: e.pop("mask"), "missing field"),
    (lambda e: e.update(editing_type_id=6), "editing_type_id must be a string"),
    (lambda e: e.update(editing_type_id="12"), "editing_type_id must be one of"),
    (lambda e: e.update(blended_word=["a", "b"]), "blended_word must be a string"),
    (lambda e: e.update(mask=[1, 2, 3]), "mask must be"),
    (lambda e: e.update(mask=[-5, 2]), "mask must be"),
    (lambda e: e.update(mask=[1.5, 2]), "mask must be"),
    (lambda e: e.update(image_path="nowhere.png"), "not found"),
    (lambda e: e.update(mask=[0, 10 ** 30]), "mask must be"),  # a huge run length: was an OverflowError
    (lambda e: e.update(image_path="../mapping_file.json"), "leaves annotation_images"),
    (lambda e: e.update(image_path="/etc/passwd"), "leaves annotation_images"),
    (lambda e: e.update(image_path="a/../../x.png"), "leaves annotation_images"),
])
def test_malformed_entry_one_line(tmp_path, edit, what):
    root = tmp_path / "bench"
    write_set(root)
    path = root / "mapping_file.json"
    raw = json.load(open(path))
    edit(raw["008"])
    json.dump(raw, open(path, "w"))
    with pytest.raises(ValueError) as e:
        read_benchmark(root)
    msg = str(e.value)
    assert "\n" not in msg and what in msg and "'008'" in msg and str(path) in msg


def test_an_image_that_is_not_one_is_named_on_reading(tmp_path):
    """A truncated or non-image file fails when the benchmark is read, before any model loads, in one
    line (was: "cannot identify image file" from deep inside PIL, after the model had loaded)."""
    root = tmp_path / "bench"
    write_set(root)
    item = read_benchmark(root)[0]
    path = root / "annotation_images" / item.image_path
    whole = path.read_bytes()
    for bad in (b"not a png", whole[:len(whole) // 2]):  # the second: a valid header, its data cut short
        path.write_bytes(bad)
        with pytest.raises(ValueError) as e:
            read_benchmark(root)
        assert "\n" not in str(e.value) and "not a readable image" in str(e.value) and repr(item.key) in str(e.value)


def test_malformed_file(tmp_path):
    with pytest.raises(ValueError, match="no mapping_file.json"):
        read_benchmark(tmp_path)
    (tmp_path / "mapping_file.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold an object"):
        read_benchmark(tmp_path)
    (tmp_path / "mapping_file.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_benchmark(tmp_path)
