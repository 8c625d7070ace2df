"""Features on SDXL: `extract` against diffusers' SDXL UNet on a non-square image (its size in the time ids),
`correspond` and the probes on the small random SDXL (tests/conftest.py), and every paper layer proven as in
tests/test_paper_layers.py: values against diffusers' modules on the small SDXL (1-, 2- and 3-deep transformers),
names and shapes against diffusers' module names on the full-size SDXL built on the meta device."""
import types

import pytest
import torch
from einops import rearrange

import sdlens
from sdlens.features import correspond, extract, paper_hooks, paper_layer, paper_layers, probe_sweep
from sdlens.features.layers import GDF_PRACTICAL, PAPERS, dift_index, dift_layer
from sdlens.unet import SD1, SD2_V, SDXL, UNetModel
from sdlens.unet.model import pack_added_cond
from sdlens.tests.test_paper_layers import TOL, check_gdf_names, gdf_oracle  # the oracles written from GDF's code

# diffusers' SDXL base UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json), our `SDXL`.
SDXL_DIFFUSERS = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(320, 640, 1280),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                      cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


@pytest.fixture(scope="module")
def sd(sdxl_fixture):
    return sdlens.load(sdxl_fixture["folder"])


def image(h, w, seed=0):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def module_outputs(unet, call):
    """Every named module's output (element 0 of a tuple) during `call()`, and the input of each resnet (ODISE)."""
    outs, inputs, handles = {}, {}, []
    for name, m in unet.named_modules():
        if not name:
            continue
        handles.append(m.register_forward_hook(
            lambda m, a, o, name=name: outs.__setitem__(name, o[0] if isinstance(o, tuple) else o)))
        if ".resnets." in name and name.count(".") == 3:
            handles.append(m.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0])))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return outs, inputs


def theirs_as_map(v, hw):
    """A diffusers token output [B, N, C] as GDF stores it (FeatureStore.store): [B, C, h, w]."""
    return rearrange(v, "b (h w) c -> b c h w", h=hw[0]) if v.ndim == 3 else v


# ---- extract ----

def test_extract_equals_diffusers_sdxl_at_the_images_size(sd, sdxl_fixture):
    """DIFT's recipe by hand on diffusers' SDXL: posterior mean, DDIM add_noise at t with extract's documented
    draws, prompt embeddings and pooled vector from its encode_prompt, time ids of the image's own 32x64 (not
    the model's 64x64). DIFT's default layer (up_blocks[0], our output_blocks.2) and GDF's XL cross-q."""
    pipe, t, h, w, seed = sdxl_fixture["pipe"], 261, 32, 64, 5
    x = torch.cat([image(h, w, 0), image(h, w, 1)])
    gdf_q = paper_layer("gdf", "up-level1-repeat0-vit-block0-cross-q", unet=sd.unet)
    names = [dift_layer(sd), gdf_q]
    assert names == ["output_blocks.2.hook_out", "output_blocks.3.1.transformer_blocks.0.attn2.hook_q"]
    ours = extract(sd, x, names, t=t, prompt=["a cat", "a dog"], seed=seed, posterior="mean")

    with torch.no_grad():
        z = pipe.vae.encode(2 * x - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        g = torch.Generator().manual_seed(seed)
        torch.randn(z.shape, generator=g)  # extract's first draw is the posterior's, unused with the mean
        zt = pipe.scheduler.add_noise(z, torch.randn(z.shape, generator=g), torch.tensor([t]))
        emb, _, pooled, _ = pipe.encode_prompt(["a cat", "a dog"], device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
    ids = torch.tensor([[h, w, 0, 0, h, w]] * 2, dtype=torch.float32)  # diffusers' default for an h x w image
    theirs, _ = module_outputs(pipe.unet, lambda: pipe.unet(zt, t, emb, added_cond_kwargs={"text_embeds": pooled,
                                                                                          "time_ids": ids}))
    assert ours[names[0]].shape == (2, 64, h // 16, w // 16)  # 1/16 of the image, DIFT's resolution
    torch.testing.assert_close(ours[names[0]], theirs["up_blocks.0"], atol=1e-4, rtol=1e-4)
    q = theirs["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"]
    torch.testing.assert_close(ours[gdf_q], theirs_as_map(q, (h // 16, w // 16)), atol=1e-4, rtol=1e-4)
    # the square default size's time ids would give another feature: the size does reach the UNet
    wrong = pack_added_cond(emb, pooled, torch.tensor([[64, 64, 0, 0, 64, 64]] * 2), sd.unet.cfg)
    with torch.no_grad(), sd.unet.record(lambda n: n == names[0]) as store:
        sd.unet(zt, t, wrong)
    assert (store[names[0]][0] - ours[names[0]]).abs().max() > 1e-3


def test_extract_matches_a_recorded_unet_call(sd):
    """extract's value at a self-attention k (made spatial) is the hook's value during one UNet call with the
    same latents, timestep and context (sd.encode_prompt with the image's size), for a DDIM-inverted latent."""
    x, t = image(64, 32, 2), 101
    name = sd.unet.hook_names(place="mid", kind="self_attention", point="k")[-1]  # the middle block's last layer
    got = extract(sd, x, name, t=t, inversion="ddim")[name]
    from sdlens.features.extract import ddim_to
    ctx = sd.encode_prompt([""], size=(64, 32))
    zt = ddim_to(sd, sd.encode_image(x), t, ctx)
    with torch.no_grad(), sd.unet.record(lambda n: n == name) as store:
        sd.unet(zt, t, ctx)
    k = store[name][0]  # [B, heads, h*w, d]
    assert sd.unet.hook_info(name).transformer_block == 2  # the small SDXL's 3-deep middle transformer
    torch.testing.assert_close(got, rearrange(k, "b a (h w) d -> b (a d) h w", h=2), atol=1e-6, rtol=1e-6)


# ---- correspondence and probes ----

def test_correspond_on_sdxl(sd):
    src, trg = image(40, 56, 3)[0], image(64, 48, 4)[0]
    pts = [[0, 0], [55, 39], [20.4, 10.6]]
    a = correspond(sd, src, pts, trg, ensemble=2)
    assert a.shape == (3, 2) and a.dtype == torch.float32
    assert ((a >= 0) & (a <= torch.tensor([47, 63]))).all() and (a == a.round()).all()  # target pixels (x, y)
    assert torch.equal(a, correspond(sd, src, pts, trg, ensemble=2, name=dift_layer(sd)))  # the default is DIFT's


def test_probe_sweep_on_sdxl(sd):
    kinds = ("resblock", "cross_q")
    rows = probe_sweep(sd, ts=(101,), kinds=kinds, n_train=3, n_test=2, baselines=False)
    hooks = [r["hook"] for r in rows]
    assert hooks == [n for k, p in (("resblock", "out"), ("cross_attention", "q")) for n in sd.unet.hook_names(kind=k, point=p)]
    # the small SDXL: 6 + 2 + 9 ResBlocks; cross-attention in 1-, 2- and 3-deep transformers at levels 1-2 and middle
    assert sum(r["kind"] == "resblock" for r in rows) == 17
    assert sum(r["kind"] == "cross_q" for r in rows) == 2 * 2 + 2 * 3 + 3 + 3 * 2 + 3 * 3
    assert all(0 <= r["miou"] <= 1 for r in rows)


# ---- paper layers: values on the small SDXL ----

@pytest.fixture(scope="module")
def small_run(sd, sdxl_fixture):
    """Every diffusers module's output and every hook of ours on one forward with the same weights and inputs."""
    unet = sdxl_fixture["pipe"].unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 8, generator=g)  # non-square, so a transposed layout would show
    tokens = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(2, sd.unet.cfg.pooled_dim, generator=g)
    ids = torch.tensor([[128, 64, 0, 0, 128, 64]] * 2, dtype=torch.float32)
    theirs, inputs = module_outputs(unet, lambda: unet(x, 501, tokens, added_cond_kwargs={"text_embeds": pooled,
                                                                                          "time_ids": ids}))
    with torch.no_grad(), sd.unet.record(lambda n: True) as store:
        sd.unet(x, 501, pack_added_cond(tokens, pooled, ids, sd.unet.cfg))
    return dict(unet=unet, ours_unet=sd.unet, theirs=theirs, inputs=inputs, ours={k: v[0] for k, v in store.items()})


def as_theirs(run, name):
    v = run["ours"][name]
    return rearrange(v, "b h n d -> b n (h d)") if run["ours_unet"].hook_info(name).point in "qkv" else v


def test_every_diffusers_module_on_small_sdxl(small_run):
    run, mapped = small_run, []
    for name, _ in run["unet"].named_modules():
        try:
            hook = paper_layer("diffusers", name, unet=run["ours_unet"])
        except ValueError as e:
            assert "no sdlens hook point" in str(e)
            continue
        torch.testing.assert_close(as_theirs(run, hook), run["theirs"][name], **TOL, msg=name)
        mapped.append(name)
    assert sorted(mapped) == sorted(paper_layers("diffusers", run["ours_unet"]))
    # deeper transformer blocks are mapped one by one: the middle block's third
    assert "mid_block.attentions.0.transformer_blocks.2.attn2.to_q" in mapped


def test_gdf_every_activation_on_small_sdxl(small_run):
    check_gdf_names(small_run, gdf_oracle(small_run["unet"]), as_theirs)


def test_paper_tables_on_small_sdxl(small_run):
    """DIFT, PnP, VPD and ODISE on SDXL's 3 levels (9 output blocks): written from each paper's code as in
    tests/test_paper_layers.py. VPD's and ODISE's block 11 does not exist here."""
    run, ours = small_run, small_run["ours_unet"]
    dift = {i: f"up_blocks.{i}" for i in range(3)}
    pnp = {n: f"up_blocks.{n // 3}.resnets.{n % 3}.conv2" for n in range(9)}
    # VPD's output_blocks 7, 4, 1: block 7 is at level 0 (no attention on SDXL), 4 and 1 end in their attention
    vpd = {1: "up_blocks.2.resnets.1", 2: "up_blocks.1.attentions.1", 3: "up_blocks.0.attentions.1"}
    for paper, table in (("dift", dift), ("pnp", pnp), ("vpd", vpd)):
        assert paper_layers(paper, ours) == list(table)
        for layer, module in table.items():
            torch.testing.assert_close(run["ours"][paper_layer(paper, layer, ours)], run["theirs"][module], **TOL,
                                       msg=f"{paper} {layer}")
    assert paper_layers("odise", ours) == [0, 1, 2]
    for k in range(3):  # the input of output_blocks 2, 5, 8: of each level's last resnet
        got = torch.cat([run["ours"][h] for h in paper_hooks("odise", k, ours)], dim=1)
        torch.testing.assert_close(got, run["inputs"][f"up_blocks.{k}.resnets.2"], **TOL, msg=f"odise {k}")


# ---- paper layers: names on the full-size SDXL (meta device) ----

@pytest.fixture(scope="module")
def full_size():
    """diffusers' SDXL base UNet and ours, both on the meta device, with every module's / hook's output shape
    for a 16x16 latent (shapes only: no memory)."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_DIFFUSERS)
        ours = UNetModel(SDXL)
        x, tokens = torch.zeros(1, 4, 16, 16), torch.zeros(1, 77, 2048)
        cond = {"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6)}
        theirs, _ = module_outputs(unet, lambda: unet(x, torch.tensor([1]), tokens, added_cond_kwargs=cond))
    return dict(unet=unet, ours=ours, theirs={k: tuple(v.shape) for k, v in theirs.items()},
                shapes=ours.hook_shapes(16, 16))


def test_full_size_sdxl_diffusers_names(full_size):
    unet, ours, shapes = full_size["unet"], full_size["ours"], full_size["shapes"]
    mapped = []
    for name, _ in unet.named_modules():
        try:
            hook = paper_layer("diffusers", name, unet=ours)
        except ValueError:
            continue
        want = full_size["theirs"][name]
        got = shapes[hook]
        if ours.hook_info(hook).point in "qkv":
            got = (got[0], got[2], got[1] * got[3])
        assert got == want, name
        mapped.append(name)
    assert sorted(mapped) == sorted(paper_layers("diffusers", ours))
    # conv_in/out, 7 blocks, 6 + 2 + 9 resnets and their conv2, 4 + 1 + 6 transformers of depth 2 or 10 (70
    # transformer blocks, each itself and 2 attentions x 5 paths), 2 downsamplers and 2 upsamplers
    assert len(mapped) == 2 + 7 + 2 * 17 + 11 + 70 * 11 + 4
    assert (paper_layer("diffusers", "up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_k", unet=ours)
            == "output_blocks.2.1.transformer_blocks.9.attn1.hook_k")


def test_full_size_sdxl_gdf_names(full_size):
    """Every GDF activation named as GDF names SDXL's diffusers modules: the names agree with ours, each hook's
    shape is that module's (GDF's `map` from the heads and to_q / to_k shapes)."""
    unet, ours, shapes = full_size["unet"], full_size["ours"], full_size["shapes"]
    oracle = gdf_oracle(unet)
    assert sorted(paper_layers("gdf", ours)) == sorted(n for n, v in oracle.items() if v is not None)
    for name, src in oracle.items():
        if src is None:
            continue
        hook = paper_layer("gdf", name, unet=ours)
        got = shapes[hook]
        if src[0] == "map":
            q, k = full_size["theirs"][src[1] + ".to_q"], full_size["theirs"][src[1] + ".to_k"]
            want = (q[0], unet.get_submodule(src[1]).heads, q[1], k[1])
        else:
            want = full_size["theirs"][src[0]]
            if ours.hook_info(hook).point in "qkv":
                got = (got[0], got[2], got[1] * got[3])
        assert got == want, name


def test_gdf_xl_practical_config(full_size):
    """config_xl_practical.json: its cross-q is output_blocks.3.1's first transformer block (640 channels at 1/16
    of the image); the other three are transformer blocks' token outputs (`transformer_blocks.K.hook_out`)."""
    ours = full_size["ours"]
    block7, block5, cross_q, block0 = GDF_PRACTICAL["sdxl"]
    assert paper_layer("gdf", cross_q, unet=ours) == "output_blocks.3.1.transformer_blocks.0.attn2.hook_q"
    assert full_size["shapes"]["output_blocks.3.1.transformer_blocks.0.attn2.hook_q"] == (1, 10, 8 * 8, 64)
    assert paper_layer("gdf", block7, unet=ours) == "output_blocks.0.1.transformer_blocks.7.hook_out"
    assert paper_layer("gdf", block5, unet=ours) == "output_blocks.0.1.transformer_blocks.5.hook_out"
    assert paper_layer("gdf", block0, unet=ours) == "output_blocks.3.1.transformer_blocks.0.hook_out"
    assert full_size["shapes"]["output_blocks.0.1.transformer_blocks.7.hook_out"] == (1, 4 * 4, 1280)
    # GDF's vit-block index is our transformer_blocks index, up to SDXL's 10-deep transformers
    assert (paper_layer("gdf", "up-level0-repeat0-vit-block7-self-q", unet=ours)
            == "output_blocks.0.1.transformer_blocks.7.attn1.hook_q")
    assert paper_layer("gdf", "mid-vit-block9-cross-map", unet=ours) == "middle_block.1.transformer_blocks.9.attn2.hook_probs"
    with pytest.raises(ValueError, match="not a GDF activation"):
        paper_layer("gdf", "up-level0-repeat0-vit-block10-self-q", unet=ours)
    with pytest.raises(ValueError, match="not a GDF activation"):  # SDXL has no attention at level 0 (up-level2)
        paper_layer("gdf", "up-level2-repeat0-vit-block0-self-q", unet=ours)


def test_every_paper_name_exists_in_full_size_sdxl(full_size):
    ours = full_size["ours"]
    names = set(ours.hook_names())
    for paper in PAPERS:
        layers = paper_layers(paper, ours)
        assert layers
        for layer in layers:
            assert set(paper_hooks(paper, layer, unet=ours)) <= names
    assert paper_layers("dift", ours) == [0, 1, 2] and paper_layers("pnp", ours) == list(range(9))
    with pytest.raises(ValueError, match="output block 11, which this 3-level UNet lacks"):
        paper_layer("vpd", 0, unet=ours)


def test_dift_index_is_one_sixteenth_of_the_image(full_size):
    """DIFT's SD 2.1 default (up_ft_index 1) reads 1/16 of the image; SDXL's counterpart is index 0. sdlens-tiny
    (VAE factor 4) has no 1/16 up block and keeps DIFT's 1."""
    from sdlens.weights.config import folder_configs
    from sdlens.weights.load import TINY_DIR
    with torch.device("meta"):
        unets = {k: UNetModel(c) for k, c in (("sd1", SD1), ("sd2", SD2_V), ("tiny", folder_configs(TINY_DIR)["unet"]))}
    unets["sdxl"] = full_size["ours"]
    model = lambda k, f=8: types.SimpleNamespace(unet=unets[k], latent_factor=f)
    assert dift_index(model("sd1")) == 1 and dift_layer(model("sd1")) == "output_blocks.5.hook_out"
    assert dift_index(model("sd2")) == 1
    assert dift_index(model("sdxl")) == 0 and dift_layer(model("sdxl")) == "output_blocks.2.hook_out"
    assert dift_index(model("tiny", 4)) == 1
    # at 768x768 (96x96 latents): SD 2.1's index 1 and SDXL's index 0 are both 48x48 maps of 1280 channels
    assert unets["sd2"].hook_shapes(96, 96)["output_blocks.5.hook_out"] == (1, 1280, 48, 48)
    assert unets["sdxl"].hook_shapes(96, 96)["output_blocks.2.hook_out"] == (1, 1280, 48, 48)
