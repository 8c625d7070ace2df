"""Editing methods, built on the patch layer (`editing/patch.py`) over the public hook API and the sampler."""
from ..inversion import Inversion, invert_image, load_image
from ..visualize import attention_grid, cross_attention_grid
from .attend_excite import attend_and_excite
from .attention_maps import attention_maps
from .attention_store import AttentionStore
from .freeu import freeu
from .p2p import EditResult, LocalBlend, PromptToPrompt
from .pag import pag_generate
from .style_aligned import style_aligned
