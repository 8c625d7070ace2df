"""Bad input gives one clear line naming the problem; the CLI exits 2 and never overwrites."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdlens
from sdlens import WeightsError


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    with pytest.raises(WeightsError) as e:
        sdlens.load(p)
    assert "empty" in one_line(e)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(fixture, tmp_path, keep):
    data = open(fixture["single"], "rb").read()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(WeightsError) as e:
        sdlens.load(p)
    assert "truncated or corrupt" in one_line(e)


def test_garbage_file(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(WeightsError) as e:
        sdlens.load(p)
    assert "truncated or corrupt" in one_line(e)


def test_wrong_model(tmp_path):
    p = tmp_path / "bert.safetensors"
    save_file({"encoder.layer.0.attention.self.query.weight": torch.zeros(4, 4)}, str(p))
    with pytest.raises(WeightsError) as e:
        sdlens.load(p)
    assert "no Stable Diffusion UNet" in one_line(e)
    q = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(1), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(q))
    with pytest.raises(WeightsError, match="SDXL"):
        sdlens.load(q)


def test_pickle_refused_unless_opted_in(fixture, tmp_path):
    p = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(fixture["single"])}, str(p))
    with pytest.raises(WeightsError) as e:
        sdlens.load(p)
    assert "allow_pickle=True" in one_line(e)
    sd = sdlens.load(p, allow_pickle=True)  # weights_only=True underneath
    ref = sdlens.load(fixture["single"])
    assert torch.equal(sd.unet.out[2].weight, ref.unet.out[2].weight)


def test_missing_key_and_wrong_shape(fixture, tmp_path):
    sd = load_file(fixture["single"])
    k = "model.diffusion_model.output_blocks.4.1.proj_out.bias"
    missing = dict(sd)
    del missing[k]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError) as e:
        sdlens.load(tmp_path / "missing.safetensors")
    msg = one_line(e)
    assert "1 missing" in msg and "output_blocks.4.1.proj_out.bias" in msg and "single file" in msg
    wrong = dict(sd)
    wrong["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(WeightsError) as e:
        sdlens.load(tmp_path / "wrong.safetensors")
    assert "shape mismatches" in one_line(e) and "decoder.conv_in.weight" in str(e.value)
    extra = dict(sd)
    extra["model.diffusion_model.lora_up.weight"] = torch.zeros(2)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(WeightsError, match="1 unexpected"):
        sdlens.load(tmp_path / "extra.safetensors")


def test_broken_folder(fixture, tmp_path):
    import shutil
    bad = tmp_path / "folder"
    shutil.copytree(fixture["folder"], bad)
    os.remove(bad / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match="no diffusion_pytorch_model.safetensors"):
        sdlens.load(bad)
    os.remove(bad / "model_index.json")
    with pytest.raises(WeightsError, match="model_index.json: missing"):
        sdlens.load(bad)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sdlens", *args], capture_output=True, text=True, timeout=300)


def test_cli_errors_and_no_overwrite(sd1_fixture, tmp_path):
    fixture = sd1_fixture
    out = tmp_path / "img.png"
    r = cli("generate", "--model", str(tmp_path / "nope.safetensors"), "--prompt", "x", "--out", str(out))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr
    r = cli("generate", "--model", fixture["folder"], "--prompt", "x", "--out", str(out), "--height", "60")
    assert r.returncode == 2 and "multiples of 8" in r.stderr and not out.exists()
    r = cli("generate", "--model", fixture["folder"], "--prompt", "a cat", "--steps", "2", "--height", "64",
            "--width", "64", "--out", str(out))
    assert r.returncode == 0, r.stderr
    before = out.read_bytes()
    r = cli("generate", "--model", fixture["folder"], "--prompt", "a dog", "--steps", "2", "--out", str(out))
    assert r.returncode == 2 and "--force" in r.stderr and out.read_bytes() == before
    r = cli("generate", "--model", fixture["folder"], "--prompt", "a dog", "--steps", "2", "--height", "64",
            "--width", "64", "--seed", "5", "--out", str(out), "--force")
    assert r.returncode == 0 and out.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]  # no temporary files left behind
    r = cli("generate", "--prompt", "x", "--steps", "zero", "--out", str(out))
    assert r.returncode == 2
