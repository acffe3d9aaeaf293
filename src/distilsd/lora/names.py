"""The file names a LoRA run folder holds."""

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' layout (save_lora_weights / load_lora_weights)
KOHYA_WEIGHTS = "lora_kohya.safetensors"  # the kohya / AUTOMATIC1111 layout, written on request
LORA_INFO = "lora_info.json"  # what the adapter was trained on: base model, rank, alpha, steps
