"""The CLIP text transformer (Radford et al. 2021), as SD uses it.

Module names are those of the SD 1.x checkpoint (`cond_stage_model.transformer.text_model.*`,
which is also the Hugging Face layout). SD 2.x's OpenCLIP ViT-H text tower is the same network
with GELU instead of quick-GELU; the loader maps its keys and fused `in_proj` here. SD 2 uses
the penultimate layer, so its config simply has one layer fewer (23 of 24), and the final layer
norm is applied in both cases.

SDXL has two encoders, CLIP ViT-L (HF layout) and OpenCLIP ViT-bigG, and conditions on each one's
penultimate hidden state with NO final layer norm (sgm `FrozenCLIPEmbedder(layer="hidden",
layer_idx=11)`, `FrozenOpenCLIPEmbedder2(layer="penultimate")`; diffusers `hidden_states[-2]`):
`output="penultimate"`. bigG also gives the pooled vector, `ln_final(last)[EOS] @ text_projection`,
which `text_projection` (Hugging Face's `CLIPTextModelWithProjection` name) computes.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 77
    act: str = "quick_gelu"  # OpenAI CLIP; OpenCLIP ViT-H uses "gelu"
    output: str = "last"  # the context: "last" (final layer norm of the last layer) or "penultimate" (SDXL)
    projection_dim: int = 0  # > 0: a `text_projection` gives the pooled vector (SDXL's bigG)
    # Padding is the tokenizer's business: SD 1 pads with <|endoftext|>, SD 2 with "!" (id 0).


SD1 = TextConfig()
SD2 = TextConfig(hidden_size=1024, num_layers=23, num_heads=16, intermediate_size=4096, act="gelu")
# SDXL (sgm sd_xl_base.yaml conditioner): CLIP ViT-L and OpenCLIP ViT-bigG/14, both whole, read at the penultimate layer.
SDXL_L = TextConfig(output="penultimate")
SDXL_G = TextConfig(hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, act="gelu",
                    output="penultimate", projection_dim=1280)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # the sigmoid approximation OpenAI CLIP was trained with


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # text tokens see only the past
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = quick_gelu if cfg.act == "quick_gelu" else F.gelu

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn, self.mlp = CLIPAttention(cfg), CLIPMLP(cfg)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(cfg.hidden_size), nn.LayerNorm(cfg.hidden_size)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.hidden_size)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers)])


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings, self.encoder = Embeddings(cfg), Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, ids, penultimate=False):
        """The final layer norm of the last layer; with `penultimate`, also the state before the last layer."""
        x = self.embeddings(ids)
        before_last = x
        for layer in self.encoder.layers:
            before_last, x = x, layer(x)
        return (self.final_layer_norm(x), before_last) if penultimate else self.final_layer_norm(x)


class CLIPTextEncoder(nn.Module):
    """Token ids [B, 77] -> per-token embeddings [B, 77, D], the UNet's cross-attention context."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = TextTransformer(cfg)
        if cfg.projection_dim:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, ids):
        return self.encode(ids)[0]

    def encode(self, ids):
        """(context [B, 77, D], pooled [B, projection_dim] or None). The pooled vector reads the EOS
        token, the largest id, found with argmax as OpenCLIP does (the first EOS when padding with it)."""
        if self.cfg.output == "last":
            last = context = self.text_model(ids)
        else:
            last, context = self.text_model(ids, penultimate=True)
        if not self.cfg.projection_dim:
            return context, None
        eos = last[torch.arange(len(ids), device=ids.device), ids.argmax(dim=-1)]
        return context, self.text_projection(eos)
