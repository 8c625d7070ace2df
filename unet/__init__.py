from .config import SD1, SD2, SD2_V, UNetConfig
from .model import UNetModel
