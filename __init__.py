"""sdlens: Stable Diffusion written to be read, hooked and checked layer by layer."""
import torch

from .hooks import HookPoint, StepContext
from .pipeline import StableDiffusion
from .weights import WeightsError

__version__ = "0.1.0"


def load(source=None, *, device="cpu", dtype=torch.float32, prediction_type=None, allow_pickle=False) -> StableDiffusion:
    """Load SD 1.x/2.x weights: a single-file .safetensors checkpoint, a diffusers folder, or
    None for the bundled sdlens-tiny model. Strict: every weight filled, every key used."""
    from .weights import load_components
    return StableDiffusion(**load_components(source, device=device, dtype=dtype,
                                             prediction_type=prediction_type, allow_pickle=allow_pickle))
