"""Editing methods, built only on the public hook API (`sdlens.hooks`) and the sampler."""
from .attention_maps import attention_maps
from .attention_store import AttentionStore
from ..inversion import Inversion, invert_image, load_image
from .p2p import EditResult, LocalBlend, PromptToPrompt
from ..visualize import attention_grid, cross_attention_grid
