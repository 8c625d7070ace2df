from .config import SD1, SD2, SD2_V, SDXL, UNetConfig
from .model import UNetModel
