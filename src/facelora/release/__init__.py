"""What leaves the workflow: the final LoRA, merges and its export layouts."""
