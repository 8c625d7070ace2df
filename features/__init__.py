"""Diffusion features beyond editing: extraction at any hook point, every paper's layer names,
semantic correspondence (DIFT) and linear probes over layer x timestep.

Built only on the public hook API (`sd.unet.hooks`, `hook_info`), like `editing/`.
"""
from .correspondence import correspond, draw_matches, pck
from .extract import DIFT_T, extract, feature_names
from .layers import dift_index, dift_layer, paper_hooks, paper_layer, paper_layers
from .pca import collect, pca_rgb, resolve_layers
from .probe import fit_probe, fit_ridge, miou, probe_names, probe_sweep, random_unet
