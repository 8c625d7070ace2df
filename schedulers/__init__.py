from .ddim import DDIMConfig, alphas_cumprod, ddim_invert_step, ddim_step, invert, sample, timesteps
