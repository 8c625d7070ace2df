"""UNet configuration: a small frozen dataclass with the SD 1.x and 2.x presets.

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

    def __post_init__(self):
        n = len(self.channel_mult)
        assert len(self.num_heads) == n, "num_heads needs one entry per level"
        assert all(0 <= a < n for a in self.attention_levels)


SD1 = UNetConfig()  # 8 heads everywhere (v1-inference.yaml: num_heads: 8)
# v2-inference.yaml: num_head_channels: 64, so heads = channels / 64 per level.
SD2 = UNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, use_linear_in_transformer=True)
SD2_V = UNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, use_linear_in_transformer=True,
                   upcast_attention=True)
