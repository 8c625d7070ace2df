from .clip import CLIPTextEncoder, TextConfig
