"""bild: Big Little Decoder and lossless speculative decoding for Hugging Face models."""

from .api import BigLittle, GenerationResult
from .config import GenerationConfig
from .errors import BildError
from .metrics import Stats

__all__ = ["BigLittle", "GenerationConfig", "GenerationResult", "BildError", "Stats"]
__version__ = "0.1.0"
