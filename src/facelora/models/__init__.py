"""The model layer every stage shares: family adapters, loading (quantized or not), LoRA files,
sampling with the pipeline, tiny offline models, LoRA targets and training plans."""
