"""facelora: a reproducible workflow for face-editing LoRAs (data, training, evaluation)."""

__version__ = "0.1.0"
