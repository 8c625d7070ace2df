"""Bad input on the command line and in image files: one line, exit 2, nothing lost or left behind.

Most cases call `main()` in-process with the model loader replaced by a tripwire, which proves the
check happens before loading; the end-to-end cases run `python -m sdlens` on the sd1 fixture."""
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import sdlens.__main__ as cli
from sdlens.editing import load_image
from sdlens.outputs import Staged, save_image_atomic, umask


def run(argv, capsys):
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.fixture
def no_load(monkeypatch):
    def tripwire(args):
        raise AssertionError("the model was loaded before the bad input was found")
    monkeypatch.setattr(cli, "load_model", tripwire)


def png_bytes(w, h, depth, color, rows):
    """A PNG written by hand (PIL cannot write 16-bit RGB or lie about its size)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    raw = b"".join(b"\0" + r for r in rows)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def raiser(exc):
    def fn(*args, **kwargs):
        raise exc
    return fn


def picture(path, size=64):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("argv, says", [
    (["generate", "--prompt", "x", "--guidance", "nan"], "--guidance: 'nan' is not a finite number"),
    (["generate", "--prompt", "x", "--eta", "inf"], "--eta: 'inf' is not a finite number"),
    (["generate", "--prompt", "x", "--height", "0"], "--height: 0 is not a positive"),
    (["generate", "--prompt", "x", "--steps", "0"], "--steps: 0 is not a positive"),
    (["generate", "--prompt", "x", "--seed", str(2 ** 70)], "outside 0 .. 2**63-1"),
    (["generate", "--prompt", "x", "--seed", "-1"], "outside 0 .. 2**63-1"),
    (["p2p", "--prompt", "a", "--target", "b", "--cross-steps", "-0.5"], "--cross-steps: -0.5 is not a fraction"),
    (["p2p", "--prompt", "a", "--target", "b", "--self-steps", "1.5"], "--self-steps: 1.5 is not a fraction"),
    (["p2p", "--prompt", "a a car", "--target", "a a car", "--mode", "reweight"], "--equalize car=2"),
    (["p2p", "--prompt", "a", "--target", "b", "--equalize", "car=nan"], "not WORD=NUMBER"),
    (["pnp", "--image", "in.png", "--prompt", "b", "--feature-injection", "2"], "--feature-injection: 2 is not a"),
    (["features", "pca", "--image", "in.png", "--step", "1.5"], "--step: 1.5 is not a fraction"),
    (["generate", "--prompt", "x", "--device", "meta"], "--device meta holds no data"),
    (["generate", "--prompt", "x", "--device", "bogus"], "'bogus' is not a device name; available here: cpu"),
    (["generate", "--prompt", "x", "--device", f"cuda:{torch.cuda.device_count()}"], "is not available; available"),
])
def test_rejected_before_loading(argv, says, tmp_path, capsys, no_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    picture("in.png")
    out = "o.png" if argv[0] == "generate" else "o"
    rc, err = run(argv + ["--out", out], capsys)
    assert rc == 2 and "\n" not in err and says in err, err
    assert sorted(os.listdir(tmp_path)) == ["in.png"]


def test_output_paths_checked_first(tmp_path, capsys, no_load):
    img = picture(tmp_path / "in.png")
    (tmp_path / "dir.png").mkdir()
    rc, err = run(["generate", "--prompt", "x", "--out", tmp_path / "dir.png", "--force"], capsys)
    assert rc == 2 and f"--out {tmp_path / 'dir.png'} is a folder" in err
    rc, err = run(["pnp", "--image", img, "--prompt", "x", "--out", img], capsys)
    assert rc == 2 and f"--out {img} is a file; a folder is wanted" in err
    long = tmp_path / ("x" * 300) / "o"
    rc, err = run(["pnp", "--image", img, "--prompt", "x", "--out", long], capsys)
    assert rc == 2 and "300 bytes, longer than this file system's limit" in err and "\n" not in err
    rc, err = run(["generate", "--prompt", "x", "--out", img / "x.png"], capsys)
    assert rc == 2 and f"{img} is a file, not a folder" in err


def without_dac_override():
    """Root writes anywhere: drop CAP_DAC_OVERRIDE (1) from the child's bounding set (PR_CAPBSET_DROP, 24)
    so that it obeys file modes like any user."""
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for argv in (["generate", "--prompt", "x", "--out", f"{ro}/x.png"],
                 ["p2p", "--prompt", "a", "--target", "b", "--out", f"{ro}/new/folder"]):
        r = subprocess.run([sys.executable, "-m", "sdlens", *argv, "--model", "nope"], capture_output=True, text=True,
                           timeout=120, preexec_fn=without_dac_override if os.geteuid() == 0 else None)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"{ro} is not writable" in r.stderr and argv[-1] in r.stderr  # before loading the missing model
    assert os.listdir(ro) == []
    ro.chmod(0o755)


def test_input_among_outputs(tmp_path, capsys, no_load):
    (tmp_path / "o").mkdir()
    guide = picture(tmp_path / "o" / "guidance.png")
    before = guide.read_bytes()
    rc, err = run(["pnp", "--image", guide, "--prompt", "x", "--out", tmp_path / "o", "--force"], capsys)
    assert rc == 2 and "is also an output" in err and guide.read_bytes() == before
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "o")  # the same file under another name: real paths are compared
    src = picture(tmp_path / "o" / "source.png")
    rc, err = run(["p2p", "--prompt", "a", "--target", "b", "--image", link / "source.png", "--out", tmp_path / "o",
                   "--force"], capsys)
    assert rc == 2 and "is also an output" in err and src.exists()


@pytest.fixture
def no_load_bench(monkeypatch):
    """The tripwire for edit-bench and features spair, which take load_model from sdlens.cli."""
    import sdlens.editbench.cli
    import sdlens.features.cli

    def tripwire(args):
        raise AssertionError("the model was loaded before the bad --out was found")
    for module in (sdlens.editbench.cli, sdlens.features.cli):
        monkeypatch.setattr(module, "load_model", tripwire)


def test_edit_bench_never_writes_over_its_inputs(tmp_path, capsys, no_load_bench):
    """--force or not: the CSV (and its resume log) may not land on the benchmark's files or the model's."""
    from sdlens.editbench.tiny import make_tiny
    data = tmp_path / "pie"
    items = make_tiny(str(data), n=4)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    (tmp_path / "link").symlink_to(data)
    inputs = [data / "mapping_file.json", data / "annotation_images" / items[-1].image_path,  # past --limit too
              tmp_path / "link" / "mapping_file.json", model]
    for out in inputs:
        before = {p: p.read_bytes() for p in inputs}
        for force in (["--force"], []):
            rc, err = run(["edit-bench", "--data", data, "--limit", 1, "--model", model, "--out", out, *force], capsys)
            assert rc == 2 and "\n" not in err and "is also an output of this command" in err, err
            assert {p: p.read_bytes() for p in inputs} == before
    assert sorted(os.listdir(data)) == ["annotation_images", "mapping_file.json"]  # no resume log left either


def write_spair_pair(root):
    """One SPair-71k test pair in its layout (what features spair reads before the model loads)."""
    (root / "JPEGImages" / "cat").mkdir(parents=True)
    (root / "PairAnnotation" / "test").mkdir(parents=True)
    for n in ("a.jpg", "b.jpg"):
        Image.new("RGB", (40, 30), "red").save(root / "JPEGImages" / "cat" / n)
    pair = root / "PairAnnotation" / "test" / "000001-a-b:cat.json"
    pair.write_text(__import__("json").dumps(dict(
        src_imname="a.jpg", trg_imname="b.jpg", src_imsize=[40, 30, 3], trg_imsize=[40, 30, 3], trg_bndbox=[0, 0, 9, 9],
        category="cat", src_kps=[[1, 2]], trg_kps=[[3, 4]])))
    return [pair, root / "JPEGImages" / "cat" / "a.jpg", root / "JPEGImages" / "cat" / "b.jpg"]


def test_features_spair_never_writes_over_its_inputs(tmp_path, capsys, no_load_bench):
    inputs = write_spair_pair(tmp_path / "SPair-71k")
    before = {p: p.read_bytes() for p in inputs}
    for out in inputs:
        for force in (["--force"], []):
            rc, err = run(["features", "spair", "--data", tmp_path / "SPair-71k", "--out", out, *force], capsys)
            assert rc == 2 and "\n" not in err and "is also an output of this command" in err, err
            assert {p: p.read_bytes() for p in inputs} == before
    assert not [p for p in tmp_path.rglob(".*partial")]


def test_decompression_bomb(tmp_path, capsys, no_load):
    bomb = tmp_path / "bomb.png"  # claims 20000 x 20000 pixels (2.2x PIL's limit) in 70 bytes
    bomb.write_bytes(png_bytes(20000, 20000, 8, 2, [b""]))
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(bomb, 64)
    rc, err = run(["pnp", "--image", bomb, "--prompt", "x", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "decompression bomb" in err and "\n" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("size, error", [(100000, ValueError), (0, ValueError), (60, ValueError), (4104, ValueError),
                                         (64.0, TypeError), (True, TypeError)])
def test_load_image_size(tmp_path, size, error):
    with pytest.raises(error, match="size"):
        load_image(picture(tmp_path / "in.png"), size)


def test_16_bit_png(tmp_path):
    """Both 16-bit kinds map v -> v >> 8, as PIL itself decodes 16-bit RGB PNGs."""
    v = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(v).save(tmp_path / "gray.png")
    assert Image.open(tmp_path / "gray.png").mode == "I;16"
    got = np.asarray(load_image(tmp_path / "gray.png", 64))
    assert np.array_equal(got, np.repeat((v >> 8)[..., None], 3, -1).astype(np.uint8))
    rgb = np.stack([v, 65535 - v, np.full_like(v, 300)], -1)
    (tmp_path / "rgb.png").write_bytes(png_bytes(64, 64, 16, 2, [r.astype(">u2").tobytes() for r in rgb]))
    assert np.array_equal(np.asarray(load_image(tmp_path / "rgb.png", 64)), (rgb >> 8).astype(np.uint8))


def test_exif_orientation(tmp_path):
    """Orientation 6: the stored top row is the displayed right side (EXIF 2.32, tag 0x0112)."""
    a = np.zeros((64, 64, 3), np.uint8)
    a[:32, :, 0] = 255  # stored top half red
    a[32:, :, 2] = 255  # stored bottom half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    got = np.asarray(load_image(tmp_path / "phone.jpg", 64)).astype(int)
    left, right = got[:, 4:28].mean((0, 1)), got[:, 36:60].mean((0, 1))
    assert left[2] > 200 and left[0] < 50 and right[0] > 200 and right[2] < 50


def modes(folder):
    return {p: stat.S_IMODE(os.stat(os.path.join(folder, p)).st_mode) for p in os.listdir(folder)}


def test_modes_follow_umask(tmp_path):
    img = Image.new("RGB", (8, 8))
    old = os.umask(0o027)
    try:
        save_image_atomic(img, tmp_path / "a.png")
        assert modes(tmp_path) == {"a.png": 0o640}
        os.chmod(tmp_path / "a.png", 0o604)
        save_image_atomic(img, tmp_path / "a.png")  # an overwritten file keeps its mode
        assert modes(tmp_path) == {"a.png": 0o604}
        with Staged(tmp_path / "o") as out:
            out.save(img, "b.png")
        assert modes(tmp_path / "o") == {"b.png": 0o640} and modes(tmp_path)["o"] == 0o750
        os.chmod(tmp_path / "o" / "b.png", 0o664)
        with Staged(tmp_path / "o", force=True) as out:
            out.save(img, "b.png")
        assert modes(tmp_path / "o") == {"b.png": 0o664}
    finally:
        os.umask(old)


def test_staged_rolls_back_a_failed_move(tmp_path, monkeypatch):
    """If the third rename fails, the two files already moved go and the overwritten one comes back."""
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "b.png").write_bytes(b"old b")
    (tmp_path / "o" / "keep.txt").write_bytes(b"keep")
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # a.png, b.png backup, b.png, c.png <- fails
            raise OSError("disk full")
        return real(src, dst)
    with pytest.raises(OSError, match="disk full"):
        with Staged(tmp_path / "o", force=True) as out:
            for name in ("a.png", "b.png", "c.png"):
                out.save(Image.new("RGB", (8, 8)), name)
            monkeypatch.setattr(os, "replace", flaky)
    assert sorted(os.listdir(tmp_path / "o")) == ["b.png", "keep.txt"] and (tmp_path / "o" / "b.png").read_bytes() == b"old b"


def files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else None


@pytest.mark.parametrize("command, exc, rc", [("p2p", RuntimeError("boom"), 2), ("p2p", KeyboardInterrupt(), 130),
                                              ("pnp", RuntimeError("boom"), 2)])
def test_failed_command_writes_nothing(sd1_fixture, tmp_path, capsys, monkeypatch, command, exc, rc):
    """A failure after some outputs were written leaves the folder as it was: new or with old files."""
    import sdlens.visualize
    import sdlens.pipeline
    img = picture(tmp_path / "in.png")
    argv = {"p2p": ["p2p", "--prompt", "a red cat", "--target", "a blue cat"],
            "pnp": ["pnp", "--image", img, "--prompt", "a cat", "--inversion-steps", "2"]}[command]
    argv += ["--model", sd1_fixture["folder"], "--steps", "2"]
    real_to_pil = sdlens.pipeline.to_pil  # p2p fails at the fifth of five files, pnp at the second of two
    monkeypatch.setattr(sdlens.visualize, "self_attention_components", raiser(exc))
    monkeypatch.setattr(sdlens.pipeline, "to_pil", lambda x: raiser(exc)() if len(x) == 1 else real_to_pil(x))
    got, err = run(argv + ["--out", tmp_path / "new" / "o"], capsys)
    assert got == rc and err.splitlines()[-1].startswith("error: boom" if rc == 2 else "interrupted")
    assert sorted(os.listdir(tmp_path)) == ["in.png"]  # no folder, no hidden staging folder
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_bytes(b"keep")
    (tmp_path / "old" / ("source.png" if command == "p2p" else "guidance.png")).write_bytes(b"old")
    before = files(tmp_path / "old")
    got, err = run(argv + ["--out", tmp_path / "old", "--force"], capsys)
    assert got == rc and files(tmp_path / "old") == before


def test_p2p_writes_what_its_help_says(sd1_fixture, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_bytes(b"keep")
    with pytest.raises(SystemExit):
        cli.main(["p2p", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    rc, err = run(["p2p", "--prompt", "a red cat", "--target", "a blue cat", "--model", sd1_fixture["folder"],
                   "--steps", "2", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    written = sorted(set(os.listdir(tmp_path / "o")) - {"keep.txt"})
    assert written and all(n in help_text for n in written) and (tmp_path / "o" / "keep.txt").read_bytes() == b"keep"
    assert set(modes(tmp_path / "o").values()) == {0o666 & ~umask()}


def test_demo_writes_all_or_nothing(sd1_fixture, tmp_path, monkeypatch):
    from sdlens.tiny import demo
    import sdlens
    sd = sdlens.load(sd1_fixture["folder"])
    monkeypatch.setattr(demo, "captioned_grid", raiser(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):  # after the eight generated images
        demo.run(sd, str(tmp_path / "demo"), steps=2)
    assert os.listdir(tmp_path) == []


def test_ctrl_c(sd1_fixture, tmp_path):
    """SIGINT mid-sampling: exit 130 with one line, no traceback, nothing written."""
    p = subprocess.Popen([sys.executable, "-m", "sdlens", "p2p", "--prompt", "a red cat", "--target", "a blue cat",
                          "--model", sd1_fixture["folder"], "--steps", "50", "--out", str(tmp_path / "o")],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    err = []
    reader = threading.Thread(target=lambda: [err.append(b) for b in iter(lambda: os.read(p.stderr.fileno(), 4096), b"")])
    reader.start()
    deadline = time.time() + 120
    while b"it/s" not in b"".join(err) and b"s/it" not in b"".join(err) and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    rc = p.wait(timeout=60)
    reader.join()
    text = b"".join(err).decode()
    assert rc == 130 and "Traceback" not in text and text.strip().splitlines()[-1].strip().endswith(
        "interrupted: nothing was written"), text
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, says", [
    (["edit-bench", "--make-tiny", "OUT", "--items", "1000000000"], "more than 4096"),
    (["features", "sweep", "--scenes", "1000000000", "--out", "OUT"], "more than 1024"),
    (["features", "correspond", "--image", "a.png", "--points", "1,1", "--target", "b.png", "--ensemble", "1000000000",
      "--out", "OUT"], "more than 256"),
])
def test_unbounded_sizes_are_refused_at_once(tmp_path, capsys, argv, says):
    """Counts that ran without end or died in the allocator are bounded, before anything runs."""
    from sdlens.__main__ import main
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
