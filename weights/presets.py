"""Named presets for single files, whose keys show the architecture but not how the model is meant
to be sampled: `load(path, config="sdxl-turbo")`. Shapes alone cannot tell SD-Turbo from SD 2.1
(768-v), nor SDXL-Turbo from SDXL base 1.0; a preset says which. The architecture still comes from
the file's shapes, and a preset of another family is refused.

Sources: the models' scheduler_config.json and model cards. SDXL base: "leading" spacing,
steps_offset 1, 1024². SDXL-Turbo: "trailing" spacing, 512², 1-4 steps at guidance 0. SD-Turbo:
SD 2.1-base (epsilon, 512²), "trailing", 1 step at guidance 0. All: scaled_linear 0.00085-0.012.

The turbo models' own samplers (Euler, Euler ancestral) end at sigma = 0, the clean image. DDIM
ends there only with `set_alpha_to_one` (else at a_0 = 0.99915), so the turbo presets, and folders
with "trailing" spacing, set it: a 1-step DDIM sample is then exactly the x0 prediction at t = 999,
sgm's reference 1-step turbo sample (`scripts/demo/turbo.py`).
"""
import dataclasses

from ..schedulers import DDIMConfig

TURBO = {"steps": 1, "guidance_scale": 0.0}
TURBO_DDIM = DDIMConfig(timestep_spacing="trailing", set_alpha_to_one=True)  # the model cards' pipe(prompt, num_inference_steps=1, guidance_scale=0.0)

PRESETS = {
    "sd1": dict(family="SD 1.x", scheduler=DDIMConfig(), default_size=512),
    "sd2": dict(family="SD 2.x", scheduler=DDIMConfig(), default_size=512),  # the 512 base models (epsilon)
    "sd2-v": dict(family="SD 2.x", scheduler=DDIMConfig(prediction_type="v_prediction"), default_size=768),
    "sd-turbo": dict(family="SD 2.x", scheduler=TURBO_DDIM, default_size=512,
                     defaults=TURBO),
    "sdxl": dict(family="SDXL", scheduler=DDIMConfig(), default_size=1024, force_zeros=True),
    "sdxl-turbo": dict(family="SDXL", scheduler=TURBO_DDIM, default_size=512,
                       defaults=TURBO, force_zeros=True),
}


def for_folder(scheduler: DDIMConfig):
    """(scheduler, sampling defaults) of a folder: "trailing" spacing marks the turbo models (1 step,
    guidance 0, DDIM ending at the clean image)."""
    if scheduler.timestep_spacing != "trailing":
        return scheduler, {}
    return dataclasses.replace(scheduler, set_alpha_to_one=True), dict(TURBO)
