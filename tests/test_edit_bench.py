"""edit-bench: the official per-item decisions, rows in order, resume, bad input, and torchrun sharding."""
import os
import subprocess
import sys
from types import SimpleNamespace as NS

import pytest
import torch

import sdlens
from sdlens.__main__ import main
from sdlens.editbench import cli as bench_cli
from sdlens.editbench import run as bench

METHODS = "ddim+p2p,direct+p2p,ddim+pnp"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(sdlens.__file__)))  # what PYTHONPATH must hold


@pytest.fixture(scope="module")
def sd():
    return sdlens.load(None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from sdlens.editbench.tiny import make_tiny
    d = str(tmp_path_factory.mktemp("pie") / "pie-tiny")
    make_tiny(d, n=4)
    return d


def args(data, out, *extra):
    return ["edit-bench", "--data", data, "--methods", METHODS, "--limit", "2", "--steps", "3", "--out", out, *extra]


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_official_decisions(sd, monkeypatch):
    """Faithful: always refine, exact blend words, target word x2; corrected: replace on equal word counts."""
    made = []
    import sdlens.editing as editing

    class Spy(editing.PromptToPrompt):
        def __init__(self, *a, **k):
            made.append(k)
            super().__init__(*a, **k)

    monkeypatch.setattr(editing, "PromptToPrompt", Spy)
    item = NS(key="x", original_prompt="a Cat, sitting", editing_prompt="a dog, sitting", blended_word=("cat", "dog"))
    image = torch.rand(1, 3, 64, 64)
    for mode in bench.MODES:
        bench.edit_item(sd, item, image, "ddim+p2p", steps=3, mode=mode)
    faithful, corrected = made
    assert (faithful["mode"], faithful["cross_replace_steps"], faithful["self_replace_steps"]) == ("refine", 0.4, 0.6)
    assert faithful["blend"].words == [[], []]  # "Cat," and "dog," are not exactly "cat", "dog" (get_word_inds)
    assert faithful["equalize"] is None
    assert corrected["mode"] == "replace" and corrected["blend"].words == [[1], [1]]
    assert corrected["equalize"] == {1: 2.0}


def test_pnp_source_rows(sd, monkeypatch):
    """ddim+pnp: the source row follows the DDIM reconstruction; faithful reads it one step late
    (run_editing_pnp.py:155, :381, :396: noisy_latent[-1-i] of the reversed list)."""
    import sdlens.editing.pnp as pnp
    seen = {}
    monkeypatch.setattr(pnp, "translate", lambda sd, image, prompt, **k: seen.update(k) or NS(pil=lambda: [None]))
    item = NS(key="x", original_prompt="a cat", editing_prompt="a dog", blended_word=None)
    image, n = torch.rand(1, 3, 64, 64), 4
    zs = bench.latents(sd, image, "a cat", n, {})
    rec = bench.reconstruction(sd, zs, "a cat", n)
    for mode, start, at_step in (("faithful", rec[0], lambda i: rec[i]),
                                 ("corrected", zs[-1], lambda i: zs[-1] if i == 0 else rec[i - 1])):
        bench.edit_item(sd, item, image, "ddim+pnp", steps=n, mode=mode)
        got = seen["latents"]
        assert torch.equal(got[-1], start)  # translate starts from zs[N] and reads zs[N - i] at step i
        assert all(torch.equal(got[n - i], at_step(i)) for i in range(n)), mode
        assert seen["negative_prompt"] == bench.PNP_NEGATIVE and seen["alpha"] == 0.0
    bench.edit_item(sd, item, image, "direct+pnp", steps=n)
    assert all(torch.equal(a, b) for a, b in zip(seen["latents"], zs))  # the inversion itself


def test_shards_and_shared_inversions(sd, monkeypatch):
    """Rank r of N takes items i % N == r; one DDIM inversion per item serves p2p and pnp."""
    calls = []
    import sdlens.inversion as inversion
    orig = inversion.ddim_latents
    monkeypatch.setattr(inversion, "ddim_latents", lambda *a, **k: calls.append(a[2]) or orig(*a, **k))
    monkeypatch.setattr(sdlens.inversion, "load_image", lambda path, sd=None: torch.rand(1, 3, 64, 64))
    items = [NS(key=str(i), image_path="x.png", original_prompt="a cat", editing_prompt="a dog", blended_word=None)
             for i in range(5)]
    metric = lambda src, out, item: {"psnr_unedit_part": 1.0}
    rows = bench.run_bench(sd, "data", items, ["ddim+p2p", "direct+p2p", "direct+pnp"], metric, rank=1, world=2, steps=2,
                           progress=False)
    assert [(r["item"], r["method"]) for r in rows] == [(i, m) for i in "13" for m in ("ddim+p2p", "direct+p2p", "direct+pnp")]
    assert calls == ["a cat", "a cat"]  # one inversion per item


def test_table_scales_and_nan():
    rows = [{"item": "a", "method": "ddim+p2p", "structure_distance": 0.01, "psnr_unedit_part": 20.0},
            {"item": "b", "method": "ddim+p2p", "structure_distance": float("nan"), "psnr_unedit_part": 30.0}]
    text = bench.table(rows, ["ddim+p2p"])
    assert text.splitlines()[0].split() == ["method", "Structure", "x1e3", "PSNR"]
    assert text.splitlines()[1].split() == ["ddim+p2p", "10.00", "25.00"]
    assert "1 NaN values skipped" in text


@pytest.mark.parametrize("bad", [["--methods", "ddim+p2p,foo+p2p"], ["--methods", "ddim+p2p,ddim+p2p"]])
def test_bad_input_exits_2_and_writes_nothing(data, tmp_path, capsys, bad):
    out = str(tmp_path / "r.csv")
    assert main(args(data, out) + bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
    if "foo" in bad[1]:
        assert ",".join(bench.METHODS) in err
    assert os.listdir(tmp_path) == []


def test_rows_in_order_and_resume(data, tmp_path, monkeypatch):
    """One row per (item, method) in order; an interrupted run resumes and writes the same CSV."""
    full = str(tmp_path / "full.csv")
    assert main(args(data, full)) == 0
    lines = read(full).decode().splitlines()
    from sdlens.editbench.pie import read_benchmark
    ids = [it.key for it in read_benchmark(data, 2)]
    assert [tuple(l.split(",")[:2]) for l in lines[1:]] == [(i, m) for i in ids for m in METHODS.split(",")]

    out = str(tmp_path / "r.csv")
    monkeypatch.setenv(bench_cli.TEST_HOOK, "4")
    assert main(args(data, out)) == 130  # interrupted after 4 rows: no CSV, a log with the settings and 4 rows
    assert not os.path.exists(out)
    with open(bench_cli.partial_path(out)) as f:
        assert len(f.read().splitlines()) == 1 + 4
    monkeypatch.delenv(bench_cli.TEST_HOOK)
    edits = []
    real = bench.edit_item
    monkeypatch.setattr(bench, "edit_item", lambda *a, **k: edits.append(a[3]) or real(*a, **k))
    assert main(args(data, out)) == 0
    assert len(edits) == 6 - 4  # only the missing rows
    assert read(out) == read(full)
    assert not os.path.exists(bench_cli.partial_path(out))


def test_a_log_of_other_settings_or_with_bad_rows_is_refused(data, tmp_path, monkeypatch, capsys):
    """A resume log records every setting that changes a row and a fingerprint of the inputs; one written
    with other settings (here another step count, or the same settings after an image changed) or
    holding a row without all its metrics is refused in one line that says how to start afresh, and
    nothing is written (it used to be reused: other results, or empty CSV cells)."""
    import json
    import shutil
    from sdlens.editbench.pie import read_benchmark
    data = str(shutil.copytree(data, tmp_path / "pie"))  # an image of it changes below
    out = str(tmp_path / "r.csv")
    log = bench_cli.partial_path(out)
    monkeypatch.setenv(bench_cli.TEST_HOOK, "3")
    assert main(args(data, out)) == 130
    monkeypatch.delenv(bench_cli.TEST_HOOK)
    capsys.readouterr()
    kept = read(log)

    def refused(argv, says):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and f"delete {log}" in err, err
        assert read(log) == kept and not os.path.exists(out)

    other = args(data, out)
    other[other.index("--steps") + 1] = "2"
    refused(other, "steps")
    lines = kept.decode().splitlines()
    row = json.loads(lines[1])
    del row["psnr_unedit_part"]
    with open(log, "w") as f:
        f.write("\n".join([lines[0], json.dumps(row)] + lines[2:]) + "\n")
    kept = read(log)
    refused(args(data, out), "line 2")
    with open(log, "wb") as f:  # the original log back, then an input image changes
        f.write(b"\n".join(l.encode() for l in lines) + b"\n")
    kept = read(log)
    path = os.path.join(data, "annotation_images", read_benchmark(str(data), 2)[0].image_path)
    from PIL import Image
    im = Image.open(path).convert("RGB")
    im.putpixel((0, 0), (0, 0, 0) if im.getpixel((0, 0)) != (0, 0, 0) else (255, 255, 255))
    im.save(path)
    refused(args(data, out), "inputs")


def test_torchrun_two_processes_match_one(data, tmp_path, capsys):
    """torchrun --nproc_per_node=2 (gloo on CPU) merges into the CSV of a single process, byte for byte."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")  # torchrun sets 1 thread; the same for both
    one, two = str(tmp_path / "one.csv"), str(tmp_path / "two.csv")
    cmd = lambda out: args(data, out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the single process runs here (a process of its own cost ~4 s more)
    try:
        assert main(cmd(one)) == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    # `python -m torch.distributed.run` is the `torchrun` script, found whatever PATH holds
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "sdlens"] + cmd(two), env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read(two) == read(one)
    assert sorted(os.listdir(tmp_path)) == ["one.csv", "two.csv"]  # the rank logs are gone


def test_torchrun_bad_data_is_one_line(data, tmp_path):
    """Bad data under torchrun: every rank reads the same inputs, so rank 0 alone says what is wrong, in
    one line, and no rank is left waiting (before, each rank printed its own copy, interleaved)."""
    import json
    import shutil
    bad = str(shutil.copytree(data, tmp_path / "bad"))
    path = os.path.join(bad, "mapping_file.json")
    raw = json.load(open(path))
    raw[next(iter(raw))]["mask"] = [0, 10 ** 30]
    json.dump(raw, open(path, "w"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "sdlens"] + args(bad, str(tmp_path / "r.csv")), env=env, capture_output=True, text=True,
                       timeout=120)
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(ours) == 1 and "mask must be" in ours[0], r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "r.csv")
    # a resume log of another run is met by every rank after the model loads: rank 0 alone says so
    (tmp_path / ".r.csv.partial").write_text('{"model": "another"}\n')
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "sdlens"] + args(data, str(tmp_path / "r.csv")), env=env, capture_output=True, text=True,
                       timeout=120)
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(ours) == 1 and "other settings" in ours[0] and "rank" not in ours[0], r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == [".r.csv.partial", "bad"]


@pytest.mark.parametrize("where", ["load", "item"])
def test_torchrun_one_rank_failing_is_one_line(data, tmp_path, where):
    """An error on one rank only, injected on rank 1: while the model loads ("no such GPU", say) or in
    the middle of its items (out of memory). One line naming the rank, and the run ends. Before: any
    RuntimeError under torchrun was taken for a failed peer and silenced, and an error at load time on a
    rank other than 0 was taken for the same bad input on every rank: no rank said why."""
    inject = tmp_path / "inject.py"
    inject.write_text(
        "import os, sys\n"
        "import sdlens.editbench.cli as cli, sdlens.editbench.run as run\n"
        "def fail(real, kind):\n"
        "    def f(*a, **k):\n"
        "        if os.environ['RANK'] == '1':\n"
        "            raise kind('injected failure\\nwith a second line')\n"
        "        return real(*a, **k)\n"
        "    return f\n"
        f"if {where!r} == 'load':\n"
        "    cli.load_model = fail(cli.load_model, ValueError)\n"
        "else:\n"
        "    run.edit_item = fail(run.edit_item, RuntimeError)\n"
        "from sdlens.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(inject)]
                       + args(data, str(tmp_path / "r.csv")), env=env, capture_output=True, text=True, timeout=120)
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and ours == ["error: rank 1: injected failure"], r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "r.csv")


def tree(folder):
    """{relative path: bytes} of every file under `folder`, hidden ones included."""
    return {os.path.relpath(os.path.join(d, f), folder): read(os.path.join(d, f))
            for d, _, names in os.walk(folder) for f in names}


def test_make_tiny_force_replaces_only_its_own_files(tmp_path, capsys, monkeypatch):
    """--make-tiny DIR --force replaces mapping_file.json and the images it writes; every other file in DIR stays,
    and --make-tiny . works from inside DIR. Without --force a non-empty DIR is refused in one line."""
    d = tmp_path / "d"
    (d / "annotation_images").mkdir(parents=True)
    (d / "notes.txt").write_bytes(b"mine")
    (d / "annotation_images" / "photo.jpg").write_bytes(b"also mine")
    (d / "mapping_file.json").write_bytes(b"{}")
    mine = {k: v for k, v in tree(d).items() if k != "mapping_file.json"}
    assert main(["edit-bench", "--make-tiny", str(d), "--items", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--force" in err
    assert tree(d) == {**mine, "mapping_file.json": b"{}"}

    assert main(["edit-bench", "--make-tiny", str(d), "--items", "4", "--force"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    from sdlens.editbench.pie import read_benchmark
    items = read_benchmark(str(d))
    after = tree(d)
    assert len(items) == 4 and {k: after[k] for k in mine} == mine
    assert set(after) == set(mine) | {"mapping_file.json"} | {f"annotation_images/{it.image_path}" for it in items}
    assert sorted(os.listdir(tmp_path)) == ["d"]  # no temporary folder left, beside DIR or in it

    monkeypatch.chdir(d)
    assert main(["edit-bench", "--make-tiny", ".", "--items", "4", "--force"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == str(d) and tree(d) == after and os.getcwd() == str(d)


def test_make_tiny_force_is_all_or_none(tmp_path, capsys, monkeypatch):
    """A move that fails half way puts DIR back as it was; a folder where PIE-tiny writes a file is refused first."""
    d = tmp_path / "d"
    (d / "annotation_images").mkdir(parents=True)
    (d / "notes.txt").write_bytes(b"mine")
    (d / "mapping_file.json").write_bytes(b"{}")
    before = tree(d)
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # mapping_file.json aside, mapping_file.json in, one image in, the second fails
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    assert main(["edit-bench", "--make-tiny", str(d), "--items", "4", "--force"]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk full" in err
    assert tree(d) == before and sorted(os.listdir(d)) == ["annotation_images", "mapping_file.json", "notes.txt"]
    assert os.listdir(d / "annotation_images") == [] and sorted(os.listdir(tmp_path)) == ["d"]

    os.unlink(d / "mapping_file.json")
    (d / "mapping_file.json").mkdir()
    assert main(["edit-bench", "--make-tiny", str(d), "--items", "4", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{d / 'mapping_file.json'} is a folder" in err
    assert tree(d) == {"notes.txt": b"mine"} and os.listdir(d / "mapping_file.json") == []
