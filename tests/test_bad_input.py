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


def test_cli_errors_and_no_overwrite(sd1_fixture, tmp_path, capsys):
    """The first and last calls run as processes (the exit code the shell sees); the rest in this process
    through `main`, which is what `python -m sdlens` runs (a process each cost ~3.5 s)."""
    from sdlens.__main__ import main

    def run(*args):
        code = main(list(args))
        return code, capsys.readouterr().err
    fixture = sd1_fixture
    out = tmp_path / "img.png"
    r = cli("generate", "--model", str(tmp_path / "nope.safetensors"), "--prompt", "x", "--out", str(out))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr
    code, err = run("generate", "--model", fixture["folder"], "--prompt", "x", "--out", str(out), "--height", "60")
    assert code == 2 and "multiples of 8" in err and not out.exists()
    code, err = run("generate", "--model", fixture["folder"], "--prompt", "a cat", "--steps", "2", "--height", "64",
                    "--width", "64", "--out", str(out))
    assert code == 0, err
    before = out.read_bytes()
    code, err = run("generate", "--model", fixture["folder"], "--prompt", "a dog", "--steps", "2", "--out", str(out))
    assert code == 2 and "--force" in err and err.strip().count("\n") == 0 and out.read_bytes() == before
    code, err = run("generate", "--model", fixture["folder"], "--prompt", "a dog", "--steps", "2", "--height", "64",
                    "--width", "64", "--seed", "5", "--out", str(out), "--force")
    assert code == 0 and out.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]  # no temporary files left behind
    r = cli("generate", "--prompt", "x", "--steps", "zero", "--out", str(out))
    assert r.returncode == 2


@pytest.mark.parametrize("field,edit", [
    (None, lambda c: [c]),                                           # a list, not an object
    ("block_out_channels", lambda c: {**c, "block_out_channels": [0] + c["block_out_channels"][1:]}),
    ("layers_per_block", lambda c: {**c, "layers_per_block": -1}),
    ("sample_size", lambda c: {**c, "sample_size": "8"}),            # was "8" * 8 as the image size
    ("cross_attention_dim", lambda c: {**c, "cross_attention_dim": 0})])
def test_bad_config_json(sd1_fixture, tmp_path, field, edit):
    """Each gave an AttributeError, ZeroDivisionError or a later TypeError; now one line naming
    the file and the field."""
    import json
    import shutil
    bad = tmp_path / "folder"
    shutil.copytree(sd1_fixture["folder"], bad)
    path = bad / "unet" / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(WeightsError) as e:
        sdlens.load(bad)
    msg = one_line(e)
    assert str(path) in msg and (field or "JSON object") in msg


def test_single_file_missing_cross_attention_or_out(fixture, tmp_path):
    """A bare StopIteration, and a KeyError whose whole message was the key, before."""
    sd = load_file(fixture["single"])
    save_file({k: v for k, v in sd.items() if "attn2" not in k}, str(tmp_path / "no_attn2.safetensors"))
    with pytest.raises(WeightsError) as e:
        sdlens.load(tmp_path / "no_attn2.safetensors")
    assert "attn2" in one_line(e) and "not a complete" in str(e.value)
    del sd["model.diffusion_model.out.2.weight"]
    save_file(sd, str(tmp_path / "no_out.safetensors"))
    with pytest.raises(WeightsError) as e:
        sdlens.load(tmp_path / "no_out.safetensors")
    assert "no model.diffusion_model.out.2.weight in this file" in one_line(e)


def test_nan_or_inf_weights_are_refused_by_name(sd1_fixture, tmp_path):
    sd = load_file(sd1_fixture["single"])
    k = "first_stage_model.decoder.conv_in.weight"
    for bad in (float("nan"), float("inf")):
        sd[k] = sd[k].clone()
        sd[k].view(-1)[7] = bad
        save_file(sd, str(tmp_path / "bad.safetensors"))
        with pytest.raises(WeightsError) as e:
            sdlens.load(tmp_path / "bad.safetensors")
        assert "VAE tensor decoder.conv_in.weight holds NaN or inf" in one_line(e)
        os.remove(tmp_path / "bad.safetensors")
    sd = load_file(sd1_fixture["single"])
    k = "model.diffusion_model.out.2.bias"
    sd[k] = sd[k] + 1e6  # finite in float32, inf in float16 (max 65504)
    save_file(sd, str(tmp_path / "big.safetensors"))
    sdlens.load(tmp_path / "big.safetensors")
    with pytest.raises(WeightsError, match="out.2.bias overflows torch.float16"):
        sdlens.load(tmp_path / "big.safetensors", dtype=torch.float16)


def test_folder_without_tokenizer_and_uppercase_pickle(sd1_fixture, tmp_path):
    import shutil
    bad = tmp_path / "folder"
    shutil.copytree(sd1_fixture["folder"], bad)
    shutil.rmtree(bad / "tokenizer")
    with pytest.raises(WeightsError) as e:  # was transformers' "Repo id must be in the form ..."
        sdlens.load(bad)
    assert "tokenizer/ folder is missing" in one_line(e)
    p = tmp_path / "evil.CKPT"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, str(p))
    with pytest.raises(WeightsError) as e:  # was read as a (corrupt) safetensors file
        sdlens.load(p)
    assert "allow_pickle=True" in one_line(e)


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(prompt=[]), ValueError, "prompt"),
    (dict(prompt=3), TypeError, "prompt"),
    (dict(negative_prompt=[None]), TypeError, "negative_prompt"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=[1, 2]), ValueError, "seed"),  # a list: one seed per prompt
    (dict(seed=[1.5]), TypeError, "seed"),
    (dict(seed=[1], eta=0.5), ValueError, "seed"),
    (dict(seed=[1], sampler="euler_ancestral"), ValueError, "seed"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
    (dict(guidance_scale=float("inf")), ValueError, "guidance_scale"),
    (dict(eta=float("nan")), ValueError, "eta"),
    (dict(eta=float("inf")), ValueError, "eta"),
    (dict(eta=1.5), ValueError, "eta"),
    (dict(steps=2.5), ValueError, "steps"),
    (dict(height=0), ValueError, "height"),  # 0 silently meant the default size
    (dict(width=-64), ValueError, "width"),
    (dict(height=64.0), TypeError, "height"),
    (dict(latents=torch.zeros(2, 4, 16, 16)), ValueError, "latents"),
    (dict(latents=[[0.0]]), TypeError, "latents")])
def test_generate_argument_errors(tiny, kwargs, error, name):
    args = {"prompt": "a red circle", "steps": 2, "progress": False, **kwargs}
    with pytest.raises(error, match=name):
        tiny.generate(args.pop("prompt"), **args)


def test_a_seed_per_prompt_gives_the_one_call_images(tiny):
    """seed=[a, b]: each row starts from the noise generate(prompt, seed=a) draws alone, so a batch gives
    the images of one call per seed (up to batched kernels' rounding; measured 5e-6 here)."""
    kw = dict(steps=3, output="tensor", progress=False)
    both = tiny.generate(["a red circle", "a blue square"], seed=[3, 5], **kw)
    one = torch.cat([tiny.generate("a red circle", seed=3, **kw), tiny.generate("a blue square", seed=5, **kw)])
    torch.testing.assert_close(both, one, atol=1e-5, rtol=0)
    assert (both[0] - tiny.generate("a red circle", seed=5, **kw)[0]).abs().max() > 0.05  # the seed matters


def test_load_dtype_and_device(tiny):
    half = sdlens.load(dtype="float16")  # the names torch and the CLI use
    assert half.dtype == torch.float16 and sdlens.load(dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        sdlens.load(dtype="fp8")
    with pytest.raises(TypeError, match="dtype must be a torch dtype"):
        sdlens.load(dtype=16)
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        sdlens.load(dtype=torch.int8)
    with pytest.raises(ValueError, match="device 'bogus' is not usable"):
        sdlens.load(device="bogus")


def test_unet_context_width_and_image_type(tiny, tmp_path):
    from sdlens.editing import invert_image, load_image
    x, d = torch.randn(1, 4, 16, 16), tiny.unet.cfg.context_dim
    for run in (tiny.unet, tiny.unet.run_with_cache):  # was a matmul shape error deep inside
        with pytest.raises(ValueError, match=f"context must be \\[B, tokens, {d}\\]"):
            run(x, 500, torch.randn(1, 77, d // 2))
    with pytest.raises(TypeError, match="image must be a PIL image"):
        invert_image(tiny, 123, "a red circle", steps=2)
    from PIL import Image
    Image.new("RGB", (80, 64), (200, 30, 30)).save(tmp_path / "red.png")
    by_path = invert_image(tiny, str(tmp_path / "red.png"), "a red circle", steps=2)  # a path is read for you
    by_image = invert_image(tiny, load_image(tmp_path / "red.png", tiny.default_size), "a red circle", steps=2)
    assert all(torch.equal(a, b) for a, b in zip(by_path.latents, by_image.latents))


def test_to_tensor_is_contiguous():
    """The channels-last view of the PIL array sent CPU convolutions down a less accurate path."""
    from PIL import Image
    from sdlens.pipeline import to_tensor
    x = to_tensor(Image.new("RGB", (24, 16)))
    assert x.shape == (1, 3, 16, 24) and x.stride() == (3 * 16 * 24, 16 * 24, 24, 1)


# ---- the Python API's bad-input classes: each case gave no error, a flat or NaN result, or an
# AttributeError / RuntimeError from deep inside torch; now one line naming the argument ----
NAN, INF = float("nan"), float("inf")


def _z(*shape, fill=None):
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return z if fill is None else z.fill_(fill)


def _img(*shape, fill=None):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    return x if fill is None else x.fill_(fill)


def _p2p(sd, **kw):
    from sdlens.editing import PromptToPrompt
    return PromptToPrompt(sd, "a red circle", ["a blue circle"], steps=2).run(progress=False, **kw)


def _masa(sd, **kw):
    from sdlens.editing.masactrl import MasaCtrl
    return MasaCtrl(sd, "a red circle", "a blue circle", steps=2, start_step=1).run(progress=False, **kw)


def _pnp(sd, latents, **kw):
    from sdlens.editing.pnp import translate
    return translate(sd, None, "a blue circle", steps=2, latents=latents, progress=False, **kw)


def _invert(sd, image, prompt="a red circle", **kw):
    from sdlens.editing import invert_image
    return invert_image(sd, image, prompt, steps=2, progress=False, **kw)


def _null_text(sd, guidance_scale):
    from sdlens.inversion import ddim_latents, null_text
    return null_text(sd, ddim_latents(sd, _img(1, 3, 64, 64), "a red circle", 2), "a red circle", guidance_scale,
                     inner_steps=1)


def _unet(sd, x, t=500, batch=None, cache=False):
    context = sd.encode_prompt(["a red circle"] * (batch or (x.shape[0] if isinstance(x, torch.Tensor) else 1)))
    return (sd.unet.run_with_cache if cache else sd.unet)(x, t, context)


def _hooks(sd, fwd_hooks):
    with sd.unet.hooks(fwd_hooks):
        pass


NON_FINITE = [
    pytest.param(lambda sd: sd.generate("a red circle", steps=1, latents=_z(1, 4, 16, 16, fill=NAN), progress=False),
                 "latents", id="generate-nan-latents"),  # gave a flat image
    pytest.param(lambda sd: sd.generate("a red circle", steps=1, latents=_z(1, 4, 16, 16, fill=INF), progress=False),
                 "latents", id="generate-inf-latents"),
    pytest.param(lambda sd: _p2p(sd, latents=_z(1, 4, 16, 16, fill=NAN)), "latents", id="p2p-nan-latents"),
    pytest.param(lambda sd: _p2p(sd, latents=_z(2, 4, 16, 16, fill=-INF)), "latents", id="p2p-inf-latents"),
    pytest.param(lambda sd: _masa(sd, latents=_z(1, 4, 16, 16, fill=NAN)), "latents", id="masactrl-nan-latents"),
    pytest.param(lambda sd: _masa(sd, latents=_z(2, 4, 16, 16, fill=INF)), "latents", id="masactrl-inf-latents"),
    pytest.param(lambda sd: _pnp(sd, [_z(1, 4, 16, 16), _z(1, 4, 16, 16, fill=NAN), _z(1, 4, 16, 16)]),
                 "latents", id="pnp-nan-latents"),
    pytest.param(lambda sd: _pnp(sd, [_z(1, 4, 16, 16)] * 2 + [_z(1, 4, 16, 16, fill=INF)]),
                 "latents", id="pnp-inf-latents"),
    pytest.param(lambda sd: _invert(sd, _img(1, 3, 64, 64), method="null-text", guidance_scale=NAN),
                 "guidance_scale", id="invert-null-text-nan-guidance"),  # gave NaN embeddings
    pytest.param(lambda sd: _null_text(sd, NAN), "guidance_scale", id="null-text-nan-guidance"),
    pytest.param(lambda sd: _null_text(sd, INF), "guidance_scale", id="null-text-inf-guidance"),
    pytest.param(lambda sd: _invert(sd, _img(1, 3, 64, 64, fill=NAN)), "image", id="invert-nan-image"),
    pytest.param(lambda sd: _invert(sd, _img(3, 64, 64, fill=INF)), "image", id="invert-inf-image"),
    pytest.param(lambda sd: sd.encode_image(_img(1, 3, 64, 64, fill=NAN)), "image", id="encode-nan-image"),
    pytest.param(lambda sd: sd.encode_image(_img(2, 3, 64, 64, fill=-INF)), "image", id="encode-inf-image"),
    pytest.param(lambda sd: __import__("sdlens.editing.pnp").editing.pnp.translate(
        sd, _img(1, 3, 64, 64, fill=NAN), "a blue circle", steps=2, inversion_steps=2, progress=False), "image",
        id="pnp-nan-image"),
    pytest.param(lambda sd: __import__("sdlens.inversion").inversion.inversion_latents(sd, _img(1, 3, 64, 64, fill=NAN),
                                                                                        steps=2), "image",
                 id="inversion-latents-nan-image"),
]


@pytest.mark.parametrize("call,name", NON_FINITE)
def test_non_finite_data_is_refused_where_it_enters(tiny, call, name):
    with pytest.raises(ValueError) as e:
        call(tiny)
    msg = one_line(e)
    assert name in msg and ("NaN or inf" in msg or "finite" in msg), msg


BAD_SHAPES = [  # (call, argument, shape given, shape expected)
    pytest.param(lambda sd: _invert(sd, _img(64, 64)), "image", "(64, 64)", "[1, 3, H, W]", id="invert-2d-image"),
    pytest.param(lambda sd: _invert(sd, _img(1, 1, 64, 64)), "image", "(1, 1, 64, 64)", "[1, 3, H, W]",
                 id="invert-1-channel-image"),
    pytest.param(lambda sd: _invert(sd, _img(1, 4, 64, 64)), "image", "(1, 4, 64, 64)", "[1, 3, H, W]",
                 id="invert-4-channel-image"),
    pytest.param(lambda sd: _invert(sd, _img(2, 3, 64, 64)), "image", "(2, 3, 64, 64)", "[1, 3, H, W]",
                 id="invert-2-images"),
    pytest.param(lambda sd: sd.encode_image(_img(1, 1, 64, 64)), "image", "(1, 1, 64, 64)", "[B, 3, H, W]",
                 id="encode-1-channel-image"),
    pytest.param(lambda sd: sd.encode_image(_img(1, 3, 64, 64, 1)), "image", "(1, 3, 64, 64, 1)", "[B, 3, H, W]",
                 id="encode-5d-image"),
    pytest.param(lambda sd: _pnp(sd, [_z(1, 3, 16, 16)] * 3), "latents[0]", "(1, 3, 16, 16)", "[1, 4, h, w]",
                 id="pnp-3-channel-latents"),
    pytest.param(lambda sd: _pnp(sd, [_z(2, 4, 16, 16)] * 3), "latents[0]", "(2, 4, 16, 16)", "[1, 4, h, w]",
                 id="pnp-batch-2-latents"),  # was accepted
    pytest.param(lambda sd: _pnp(sd, [_z(1, 4, 16, 16), _z(1, 4, 8, 8), _z(1, 4, 16, 16)]), "latents[1]",
                 "(1, 4, 8, 8)", "[1, 4, 16, 16]", id="pnp-mixed-size-latents"),
    pytest.param(lambda sd: _pnp(sd, [_z(4, 16, 16)] * 3), "latents[0]", "(4, 16, 16)", "[1, 4, h, w]",
                 id="pnp-3d-latents"),
    pytest.param(lambda sd: _p2p(sd, latents=_z(1, 3, 16, 16)), "latents", "(1, 3, 16, 16)", "4, h, w]",
                 id="p2p-3-channel-latents"),
    pytest.param(lambda sd: _masa(sd, latents=_z(1, 8, 16, 16)), "latents", "(1, 8, 16, 16)", "4, h, w]",
                 id="masactrl-8-channel-latents"),
    pytest.param(lambda sd: sd.generate("a", steps=1, latents=_z(1, 3, 16, 16), progress=False), "latents",
                 "(1, 3, 16, 16)", "(1, 4, 16, 16)", id="generate-3-channel-latents"),
]
for _cache in (False, True):
    _how = "run_with_cache" if _cache else "unet"
    BAD_SHAPES += [
        pytest.param(lambda sd, c=_cache: _unet(sd, _z(1, 3, 16, 16), cache=c), "x", "(1, 3, 16, 16)",
                     "[B, 4, h, w]", id=f"{_how}-3-channel-z"),
        pytest.param(lambda sd, c=_cache: _unet(sd, _z(4, 16, 16), batch=1, cache=c), "x", "(4, 16, 16)",
                     "[B, 4, h, w]", id=f"{_how}-3d-z"),
        pytest.param(lambda sd, c=_cache: _unet(sd, _z(2, 4, 16, 16), batch=1, cache=c), "x", "(2, 4, 16, 16)",
                     "context", id=f"{_how}-z-batch-not-context-batch"),
        pytest.param(lambda sd, c=_cache: _unet(sd, _z(2, 4, 16, 16), t=torch.tensor([500, 400, 300]), cache=c),
                     "t", "(3,)", "2", id=f"{_how}-t-batch-3-for-2"),
    ]


@pytest.mark.parametrize("call,name,given,expected", BAD_SHAPES)
def test_wrong_shapes_are_refused_at_the_entry_point(tiny, call, name, given, expected):
    """Each was a RuntimeError from conv2d, group_norm or attention (or was accepted)."""
    with pytest.raises(ValueError) as e:
        call(tiny)
    msg = one_line(e)
    assert name in msg and given in msg and expected in msg, msg


def _editors():
    from sdlens.editing import PromptToPrompt
    from sdlens.editing.masactrl import MasaCtrl
    return PromptToPrompt, MasaCtrl


NONE_OR_WRONG_OBJECT = [
    pytest.param(lambda sd: _editors()[0](None, "a red circle", ["a blue circle"]), "sd", id="p2p-sd-none"),
    pytest.param(lambda sd: _editors()[0](sd, None, ["a blue circle"]), "source", id="p2p-source-none"),
    pytest.param(lambda sd: _editors()[0](sd, "a red circle", [None]), "targets[0]", id="p2p-target-none"),
    pytest.param(lambda sd: _editors()[1](None, "a red circle", "a blue circle"), "sd", id="masactrl-sd-none"),
    pytest.param(lambda sd: _editors()[1](sd, "a red circle", None), "target_prompt", id="masactrl-target-none"),
    pytest.param(lambda sd: sd.generate(None, steps=1, progress=False), "prompt", id="generate-prompt-none"),
    pytest.param(lambda sd: _p2p(sd, inversion="inversion.pt"), "inversion", id="p2p-inversion-str"),
    pytest.param(lambda sd: _p2p(sd, inversion=[_z(1, 4, 16, 16)] * 3), "inversion", id="p2p-inversion-list"),
    pytest.param(lambda sd: _masa(sd, inversion="inversion.pt"), "inversion", id="masactrl-inversion-str"),
    pytest.param(lambda sd: _hooks(sd, None), "fwd_hooks", id="hooks-none"),
    pytest.param(lambda sd: _hooks(sd, {"out.hook_out": None}), "hook function", id="hooks-fn-none"),
    pytest.param(lambda sd: _hooks(sd, {None: lambda x, h: None}), "hook point selector", id="hooks-selector-none"),
    pytest.param(lambda sd: __import__("sdlens.inversion").inversion.load_image(None, 64), "path",
                 id="load-image-none"),
    pytest.param(lambda sd: __import__("sdlens.inversion").inversion.load_image(None, sd=sd), "path",
                 id="load-image-none-sd"),
    pytest.param(lambda sd: __import__("sdlens.inversion").inversion.load_image("x.png", sd="tiny"), "sd",
                 id="load-image-sd-str"),
    pytest.param(lambda sd: _invert(None, _img(1, 3, 64, 64)), "sd", id="invert-sd-none"),
    pytest.param(lambda sd: _invert(sd, _img(1, 3, 64, 64), prompt=None), "prompt", id="invert-prompt-none"),
    pytest.param(lambda sd: _pnp(None, [_z(1, 4, 16, 16)] * 3), "sd", id="pnp-sd-none"),
    pytest.param(lambda sd: __import__("sdlens.editing.pnp").editing.pnp.translate(
        sd, None, None, steps=2, latents=[_z(1, 4, 16, 16)] * 3, progress=False), "prompt", id="pnp-prompt-none"),
    pytest.param(lambda sd: _pnp(sd, "latents.pt"), "latents", id="pnp-latents-str"),
    pytest.param(lambda sd: _unet(sd, None, batch=1), "x", id="unet-x-none"),
    pytest.param(lambda sd: _unet(sd, _z(1, 4, 16, 16), t=None), "t", id="unet-t-none"),
    pytest.param(lambda sd: sd.unet(_z(1, 4, 16, 16), 500, None), "context", id="unet-context-none"),
]


@pytest.mark.parametrize("call,name", NONE_OR_WRONG_OBJECT)
def test_none_or_wrong_object_is_a_type_error_naming_it(tiny, call, name):
    """Each was an AttributeError ('NoneType' object has no attribute ...) or a TypeError from inside."""
    with pytest.raises(TypeError) as e:
        call(tiny)
    msg = one_line(e)
    assert f"{name} must be" in msg or f"{name} for" in msg, msg  # the argument, named by us, not by torch
    assert "NoneType" not in msg, msg


@pytest.mark.parametrize("call", ["freeu", "pag_generate", "style_aligned", "attend_and_excite"])
@pytest.mark.parametrize("sd", [None, "sd15.safetensors"])
def test_new_methods_name_a_missing_model(call, sd):
    """The four methods of the patch-layer issue refuse a non-model `sd` by name (was an AttributeError
    from inside, e.g. 'NoneType' object has no attribute 'family')."""
    import sdlens.editing as editing
    args = {"freeu": (), "pag_generate": ("a red circle",), "style_aligned": (["a", "b"],),
            "attend_and_excite": ("a red circle", ["circle"])}[call]
    with pytest.raises(TypeError, match="^sd must be a StableDiffusion model"):
        getattr(editing, call)(sd, *args)
