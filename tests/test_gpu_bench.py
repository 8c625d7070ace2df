"""bench/gpu.py's CPU path end to end (small models, no compile, no profile): every entry lands in
gpu.json, the correctness checks pass, gpu.md is written, and a second run without --force refuses
(exit 2, one line) and leaves the first run's files as they were."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu.py")


def run(out, *extra):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--small", "--steps", "3", "--reps", "1",
                           "--skip-compile", "--skip-profile", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=300)


def test_gpu_bench_cpu_small(tmp_path):
    out = tmp_path / "new" / "dir"  # created if missing
    p = run(out)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((out / "gpu.json").read_text())
    entries = report["entries"]
    assert set(entries) == {"correctness", "host_syncs", "unet_forward", "attention_hooks", "channels_last", "generate",
                            "p2p", "pnp", "null_text", "dift", "sdxl", "profile"}  # the names are a contract (issue #16)
    errors = {k: v["error"] for k, v in entries.items() if "error" in v}
    assert not errors, errors
    assert entries["profile"] == {"skipped": "--skip-profile"}
    c = entries["correctness"]
    # on the CPU: float32 UNet, text encoder, VAE encode and decode, and a generate (bf16 is the GPU run's)
    assert c["total"] == 5 and c["passed"] == c["total"], c["checks"]
    assert c["size"] == 128  # not --small's 64^2, where the checks are ill-conditioned (gpu.CHECK_MIN_SIZE)
    assert entries["host_syncs"]["p2p"]["result"] == "n/a (CUDA only)"
    assert "sdlens_compiled" not in entries["generate"]["runs"]
    md = (out / "gpu.md").read_text()
    assert md.count("\n| ") >= 12 and "| entry | sdlens | baseline | ratio | aim | met? |" in md
    assert sorted(os.listdir(out)) == ["gpu.json", "gpu.md"]  # no temp file left

    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    again = run(out)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1 and "--force" in again.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_generate_check_does_not_depend_on_the_kernels(monkeypatch):
    """The fp32 generate check with sdlens on other convolution kernels than diffusers (oneDNN off for sdlens
    alone), as on a machine whose kernels differ between the two libraries: the verdict must not change. At
    --small's 64^2 (ill-conditioned: gpu.CHECK_MIN_SIZE) this made sdlens' error 5.9x diffusers' here."""
    import torch
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    from gpu import CHECK_MIN_SIZE
    from gpu_models import build_diffusers, check_generate, to_sdlens

    class OtherKernels:
        def __init__(self, sd):
            self.sd = sd

        def generate(self, *args, **kwargs):
            with torch.backends.mkldnn.flags(enabled=False):
                return self.sd.generate(*args, **kwargs)

    pipe = build_diffusers("sd1", True, torch.device("cpu"))
    size = int(os.environ.get("SDLENS_TEST_CHECK_SIZE", CHECK_MIN_SIZE))  # 64 shows the ill-conditioned case
    row, = check_generate(pipe, lambda d: OtherKernels(to_sdlens(pipe, d)), [torch.float32], torch.float64, 3, size)
    assert row["sdlens_vs_diffusers"] > 1e-7  # the two ran different kernels indeed
    assert row["passed"], row
