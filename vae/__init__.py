from .model import AutoencoderKL, VAEConfig
