from .clip import SDXL_G, SDXL_L, CLIPTextEncoder, TextConfig
