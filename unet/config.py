"""UNet configuration: a small frozen dataclass with the SD 1.x, 2.x and SDXL presets.

Field names follow the original LDM config (`model_channels`, `channel_mult`, ...); the values
are those of the public `v1-inference.yaml` and `v2-inference(-v).yaml`.
"""
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: Tuple[int, ...] = (0, 1, 2)  # levels that have a spatial transformer
    num_heads: Tuple[int, ...] = (8, 8, 8, 8)  # per level; the middle block uses the last
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD 2: Linear proj_in/proj_out instead of 1x1 conv
    upcast_attention: bool = False  # SD 2.1 768-v: attention scores in float32
    norm_groups: int = 32
    # SDXL (sgm `sd_xl_base.yaml`): transformer blocks per spatial transformer at each level, the
    # middle block taking the last level's; () means one everywhere, as in SD 1/2.
    transformer_depth: Tuple[int, ...] = ()
    # SDXL's added conditioning (`label_emb`, sgm `num_classes: sequential`): a vector of
    # adm_in_channels = pooled text + 6 numbers (sizes and crop) each embedded in time_id_dim.
    adm_in_channels: int = 0
    time_id_dim: int = 256

    def __post_init__(self):
        n = len(self.channel_mult)
        assert len(self.num_heads) == n, "num_heads needs one entry per level"
        assert all(0 <= a < n for a in self.attention_levels)
        assert not self.transformer_depth or len(self.transformer_depth) == n, "transformer_depth needs one per level"

    def depth(self, level: int) -> int:
        """Transformer blocks in a spatial transformer at `level` (the middle block: the last level)."""
        return self.transformer_depth[level] if self.transformer_depth else 1

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text vector in the added conditioning (0 without one)."""
        return self.adm_in_channels - 6 * self.time_id_dim if self.adm_in_channels else 0


SD1 = UNetConfig()  # 8 heads everywhere (v1-inference.yaml: num_heads: 8)
# v2-inference.yaml: num_head_channels: 64, so heads = channels / 64 per level.
SD2 = UNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, use_linear_in_transformer=True)
SD2_V = UNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, use_linear_in_transformer=True,
                   upcast_attention=True)
# sd_xl_base.yaml: model_channels 320, channel_mult [1, 2, 4], attention_resolutions [4, 2] (no attention
# at level 0), transformer_depth [1, 2, 10] with level 0's unused, num_head_channels 64, context_dim 2048,
# use_linear_in_transformer, adm_in_channels 2816 = 1280 pooled + 6 x 256.
SDXL = UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), num_heads=(5, 10, 20), context_dim=2048,
                  use_linear_in_transformer=True, transformer_depth=(1, 2, 10), adm_in_channels=2816)
