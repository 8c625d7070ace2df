from .convert import to_single_file
from .load import WeightsError, load_components
