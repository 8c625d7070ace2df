from .ddim import DDIMConfig, alphas_cumprod, classifier_free_guidance, ddim_invert_step, ddim_step, invert, sample, timesteps
from .euler import euler_schedule, sample_euler_ancestral
