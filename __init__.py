"""sdlens: Stable Diffusion written to be read, hooked and checked layer by layer."""
import torch

from .hooks import HookPoint, StepContext
from .pipeline import StableDiffusion
from .weights import WeightsError

__version__ = "0.1.0"


def load(source=None, *, device="cpu", dtype=torch.float32, prediction_type=None, allow_pickle=False,
         config=None, compile=False) -> StableDiffusion:
    """Load SD 1.x/2.x weights: a single-file .safetensors checkpoint, a diffusers folder, or
    None for the bundled sdlens-tiny model. Strict: every weight filled, every key used.

    dtype: a torch dtype or "float32" / "float16" / "bfloat16". config (single files only): a
    diffusers folder whose config.json files describe the file's model, or a .json file holding
    the configs `save_single_file` stores in its metadata; it overrides that metadata and the
    SD 1/2 presets. compile: True compiles the UNet (`sd.compile()`: torch.compile, one graph for all steps)."""
    from .weights import load_components
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, not {compile!r}; for torch.compile options call sd.compile(...)")
    sd = StableDiffusion(**load_components(source, device=device, dtype=dtype, prediction_type=prediction_type,
                                           allow_pickle=allow_pickle, config=config))
    return sd.compile() if compile else sd
