"""`paper_layer` proven against diffusers: on the same random weights in the SD 1.5 topology (conftest's sd1
fixture), the value at our hook equals the output of the named diffusers module (a forward hook on diffusers),
for every diffusers module the table accepts and every entry of every paper's table."""
import pytest
import torch
from einops import rearrange

import sdlens
from sdlens.features.layers import PAPERS, paper_hooks, paper_layer, paper_layers
from sdlens.unet import SD1, SD2_V, UNetModel

TOL = dict(atol=1e-5, rtol=1e-5)  # as tests/test_parity.py: float32, same weights, same input


def tiny_topology_pair():
    """A random diffusers UNet in sdlens-tiny's topology (3 levels, attention at levels 0-1, 16 norm groups, 2 heads)
    and ours with the same weights, mapped by the loader's key rules (sdlens.weights.convert)."""
    from diffusers import UNet2DConditionModel
    from sdlens.unet import UNetConfig
    from sdlens.weights.convert import unet_to_diffusers
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=16,
        block_out_channels=(32, 64, 64), attention_head_dim=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)
    with torch.no_grad():
        for p in theirs.parameters():  # random init leaves norms at exactly 1/0: perturb so every weight matters
            p.add_(torch.randn_like(p) * 0.02)
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(0, 1), num_heads=(2, 2, 2),
                     context_dim=32, norm_groups=16)
    ours = UNetModel(cfg)
    src = theirs.state_dict()
    ours.load_state_dict({k: src[unet_to_diffusers(k, cfg)] for k in ours.state_dict()})
    return theirs, ours


def forward_both(kind, unet, ours):
    """One forward of each UNet on the same input: every diffusers module's output (and the input of every
    up-block resnet, for ODISE) and every hook point of ours."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 8, generator=g)  # non-square, so a transposed layout would show
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    theirs, inputs, handles = {}, {}, []
    for name, m in unet.named_modules():
        handles.append(m.register_forward_hook(lambda m, a, out, name=name: theirs.__setitem__(name, out)))
        if ".resnets." in name and name.count(".") == 3:  # ResnetBlock2D is called as resnet(hidden_states, temb)
            handles.append(m.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0])))
    with torch.no_grad():
        unet(x, 501, ctx)
        with ours.record(lambda n: True) as store:
            ours(x, 501, ctx)
    for h in handles:
        h.remove()
    # A block returns a tuple (down blocks: (hidden_states, skips); transformers with return_dict=False: (sample,)).
    theirs = {k: v[0] if isinstance(v, tuple) else v for k, v in theirs.items()}
    return dict(kind=kind, unet=unet, ours_unet=ours, theirs=theirs, inputs=inputs,
                ours={k: v[0] for k, v in store.items()})


@pytest.fixture(scope="module")
def sd15_run(sd1_fixture):
    """conftest's SD 1.5 topology; ours loaded by sdlens.load from its diffusers folder."""
    return forward_both("sd15", sd1_fixture["pipe"].unet, sdlens.load(sd1_fixture["folder"]).unet)


@pytest.fixture(scope="module")
def tiny_run():
    return forward_both("tiny", *tiny_topology_pair())


@pytest.fixture(params=["sd15_run", "tiny_run"])
def run(request):
    return request.getfixturevalue(request.param)


def ours_as_theirs(run, name):
    """Our value in diffusers' layout: q/k/v are split per head here, [B, N, heads*d] there."""
    v = run["ours"][name]
    return rearrange(v, "b h n d -> b n (h d)") if run["ours_unet"].hook_info(name).point in "qkv" else v


def probs(attn, q, k):
    """Attention probabilities [B, heads, Q, K] as GDF computes its `map` (feature/components/attention.py
    L228-240): diffusers' own head split and get_attention_scores on the to_q / to_k outputs."""
    p = attn.get_attention_scores(attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), None)
    return p.reshape(q.shape[0], attn.heads, *p.shape[1:])


def test_every_diffusers_module_maps_to_its_output_or_raises(run):
    mapped, refused = [], []
    for name, _ in run["unet"].named_modules():
        try:
            hook = paper_layer("diffusers", name, unet=run["ours_unet"])
        except ValueError as e:
            assert "no sdlens hook point" in str(e) and "resnets.J.conv2" in str(e)
            refused.append(name)
            continue
        torch.testing.assert_close(ours_as_theirs(run, hook), run["theirs"][name], **TOL, msg=name)
        mapped.append(name)
    # every table entry is a real module, and was compared
    assert sorted(mapped) == sorted(paper_layers("diffusers", run["ours_unet"]))
    # SD 1.5: conv_in/out, 9 blocks, 22 resnets and their conv2, 16 transformers (each itself, its transformer
    # block and 2 attentions x 5 paths), 3 downsamplers and 3 upsamplers
    assert run["kind"] != "sd15" or len(mapped) == 2 + 9 + 2 * 22 + 16 * 12 + 6
    for name in ("time_embedding", "down_blocks.0.resnets.0.norm1", "down_blocks.0.resnets.0.conv1",
                 "up_blocks.1.attentions.0.proj_in", "up_blocks.1.attentions.0.transformer_blocks.0.ff",
                 "mid_block.attentions.0.norm", "conv_norm_out"):
        assert name in refused


def test_issue_examples():
    assert paper_layer("diffusers", "up_blocks.1.resnets.1") == "output_blocks.4.0.hook_out"
    assert paper_layer("diffusers", "up_blocks.1") == "output_blocks.5.hook_out"
    assert paper_layer("diffusers", "down_blocks.2.attentions.1") == "input_blocks.8.1.hook_out"
    assert (paper_layer("diffusers", "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q")
            == "output_blocks.5.1.transformer_blocks.0.attn1.hook_q")
    assert paper_layer("diffusers", "mid_block") == "middle_block.hook_out"
    assert (paper_layer("gdf", "up-level1-repeat1-vit-block0-cross-q")
            == "output_blocks.4.1.transformer_blocks.0.attn2.hook_q")
    assert paper_layer("gdf", "up-level2-repeat1-res-out") == "output_blocks.7.0.hook_out"


# Each paper's feature, written from its code as the diffusers module whose output (or input) it is.
DIFT = {i: f"up_blocks.{i}" for i in range(4)}  # dift_sd.py L141-156: up_ft[i] = the output of up_blocks[i]
# plug-and-play saves out_layers(h) of output_blocks[N][0] (openaimodel.py L295-296); in diffusers that ResBlock is
# up_blocks[N // 3].resnets[N % 3] and out_layers ends in conv2 (pnp-diffusers pnp_utils.py L134 injects there).
PNP = {n: f"up_blocks.{n // 3}.resnets.{n % 3}.conv2" for n in range(12)}
# VPD keeps output_blocks 1, 4, 7 and the last (vpd/models.py L202-206), returned reversed (L236). Block 1 is at the
# level without attention, so its output is that of its resnet; blocks 4 and 7 end in their attention.
VPD = {0: "up_blocks.3", 1: "up_blocks.2.attentions.1", 2: "up_blocks.1.attentions.1", 3: "up_blocks.0.resnets.1"}
# ODISE stores the INPUT of output_blocks 2, 5, 8, 11 (ldm.py L485-489): the input of each level's last resnet.
ODISE = {k: f"up_blocks.{k}.resnets.2" for k in range(4)}


@pytest.mark.parametrize("paper,table", [("dift", DIFT), ("pnp", PNP), ("vpd", VPD)])
def test_paper_tables(sd15_run, paper, table):
    run = sd15_run
    assert paper_layers(paper) == list(table)
    for layer, module in table.items():
        torch.testing.assert_close(run["ours"][paper_layer(paper, layer)], run["theirs"][module], **TOL,
                                   msg=f"{paper} {layer}")


def test_odise_is_the_block_input(sd15_run):
    run = sd15_run
    assert paper_layers("odise") == list(ODISE)
    for k, module in ODISE.items():
        ours = torch.cat([run["ours"][h] for h in paper_hooks("odise", k)], dim=1)
        torch.testing.assert_close(ours, run["inputs"][module], **TOL, msg=f"odise {k}")


def gdf_oracle(unet):
    """{GDF name: diffusers value getter, or None where GDF stores nothing}, named as GDF's prepare_feature_extractor
    names the diffusers modules (feature/components/feature_extractor.py L125-249)."""
    out = {"unet-in": None, "unet-after-conv-in": ("conv_in",), "unet-out": ("conv_out",)}

    def res(path, gname):
        out[f"{gname}-res-increment"], out[f"{gname}-res-out"] = (f"{path}.conv2",), (path,)

    def vit(path, gname):
        out[f"{gname}-vit-out"] = (path,)
        for i, _ in enumerate(unet.get_submodule(path).transformer_blocks):
            b = f"{path}.transformer_blocks.{i}"
            for a, kind in (("attn1", "self"), ("attn2", "cross")):
                g = f"{gname}-vit-block{i}-{kind}"
                for p in "qkv":
                    out[f"{g}-{p}"] = (f"{b}.{a}.to_{p}",)
                out[f"{g}-map"] = ("map", f"{b}.{a}")
            out[f"{gname}-vit-block{i}-out"] = (b,)  # the block's tokens (attention.py L589-590)
            out[f"{gname}-vit-block{i}-ffn-inner"] = None
    for stage in ("down", "up"):
        for lv, block in enumerate(getattr(unet, f"{stage}_blocks")):
            for r in range(len(block.resnets)):
                res(f"{stage}_blocks.{lv}.resnets.{r}", f"{stage}-level{lv}-repeat{r}")
                if getattr(block, "attentions", None):
                    vit(f"{stage}_blocks.{lv}.attentions.{r}", f"{stage}-level{lv}-repeat{r}")
            sampler = "downsamplers" if stage == "down" else "upsamplers"
            if getattr(block, sampler):
                out[f"{stage}-level{lv}-{sampler[:-1]}-out"] = (f"{stage}_blocks.{lv}.{sampler}.0",)
    res("mid_block.resnets.0", "mid-repeat0")
    res("mid_block.resnets.1", "mid-repeat1")
    vit("mid_block.attentions.0", "mid")
    for name in [n for n in out if n.endswith(("cross-k", "cross-v"))]:  # FeatureStore.store drops them (L37-39)
        out[name] = None
    return out


def test_gdf_every_activation(run):
    oracle = gdf_oracle(run["unet"])
    stored = [n for n in oracle if not n.endswith(("cross-k", "cross-v"))]
    assert run["kind"] != "sd15" or len(stored) == 197  # feature/configs/config_15_full.json: 197 names for SD 1.5
    check_gdf_names(run, oracle, ours_as_theirs)


def check_gdf_names(run, oracle, as_theirs):
    """Every GDF name: our hook's value (`as_theirs(run, hook)`) equals the diffusers value the oracle names,
    and a name GDF stores nothing for, or that has no sdlens hook, is refused. Also used for SDXL."""
    assert sorted(paper_layers("gdf", run["ours_unet"])) == sorted(n for n, v in oracle.items() if v is not None)
    for name, src in oracle.items():
        if src is None:
            with pytest.raises(ValueError, match="has no sdlens hook"):
                paper_layer("gdf", name, unet=run["ours_unet"])
            continue
        hook = paper_layer("gdf", name, unet=run["ours_unet"])
        if src[0] == "map":
            attn = run["unet"].get_submodule(src[1])
            theirs = probs(attn, run["theirs"][src[1] + ".to_q"], run["theirs"][src[1] + ".to_k"])
        else:
            theirs = run["theirs"][src[0]]
        torch.testing.assert_close(as_theirs(run, hook), theirs, **TOL, msg=name)


@pytest.mark.parametrize("cfg", [SD1, SD2_V], ids=["sd15", "sd21"])
def test_every_name_exists_in_full_size_unets(cfg):
    with torch.device("meta"):
        unet = UNetModel(cfg)
    names = set(unet.hook_names())
    for paper in PAPERS:
        layers = paper_layers(paper, unet)
        assert layers == paper_layers(paper) and layers
        for layer in layers:
            hooks = paper_hooks(paper, layer, unet=unet)
            assert hooks == paper_hooks(paper, layer) and set(hooks) <= names


def test_tiny_topology():
    """The bundled sdlens-tiny (3 levels): DIFT has 3 up blocks and VPD's / ODISE's block 11 does not exist."""
    from sdlens.weights.config import folder_configs
    from sdlens.weights.load import TINY_DIR
    with torch.device("meta"):
        unet = UNetModel(folder_configs(TINY_DIR)["unet"])
    names = set(unet.hook_names())
    assert paper_layers("dift", unet) == [0, 1, 2] and paper_layers("pnp", unet) == list(range(9))
    assert paper_layers("vpd", unet) == [1, 2, 3] and paper_layers("odise", unet) == [0, 1, 2]
    for paper in PAPERS:
        for layer in paper_layers(paper, unet):
            assert set(paper_hooks(paper, layer, unet=unet)) <= names
    with pytest.raises(ValueError, match="output block 11, which this 3-level UNet lacks"):
        paper_layer("vpd", 0, unet=unet)
    with pytest.raises(ValueError, match=r"valid: \[0, 1, 2\]"):
        paper_layer("dift", 3, unet=unet)


def test_errors():
    with pytest.raises(ValueError, match="unknown paper 'sdxl'; valid: diffusers, dift, pnp, vpd, odise, gdf"):
        paper_layer("sdxl", 0)
    with pytest.raises(ValueError, match="unknown paper"):
        paper_layers("sdxl")
    with pytest.raises(ValueError, match=r"'dift' has no layer 4; valid: \[0, 1, 2, 3\]"):
        paper_layer("dift", 4)
    with pytest.raises(ValueError, match=r"valid: \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11\]"):
        paper_layer("pnp", 12)
    with pytest.raises(TypeError, match="must be a whole number"):
        paper_layer("pnp", "4")
    with pytest.raises(TypeError, match="must be a str"):
        paper_layer("diffusers", 3)
    with pytest.raises(TypeError, match=r"unet must be an sdlens UNet \(sd.unet\), got Linear"):
        paper_layer("dift", 1, unet=torch.nn.Linear(1, 1))
    for path in ("time_embedding", "down_blocks.0.resnets.0.norm1", "down_blocks.3.attentions.0", "up_blocks.4"):
        with pytest.raises(ValueError, match=r"has no sdlens hook point .* conv_in, conv_out, mid_block"):
            paper_layer("diffusers", path)
    with pytest.raises(ValueError, match="feed-forward's inner GEGLU"):
        paper_layer("gdf", "up-level1-repeat1-vit-block0-ffn-inner")
    with pytest.raises(ValueError, match=r"not a GDF activation .* \{down\|up\}-level\{L\}-repeat\{R\}"):
        paper_layer("gdf", "up-level1-repeat1-vit-block0-cross-out")
    with pytest.raises(ValueError, match=r"channel concat of .* use paper_hooks\('odise', 1\)"):
        paper_layer("odise", 1)
