"""Training-time behaviour of LoRA variants that is not a layer (DyLoRA's rank sampling, ...)."""
