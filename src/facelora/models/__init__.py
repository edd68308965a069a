"""Model-side helpers: LoRA target modules and training plans for the supported transformers."""
