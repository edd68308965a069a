"""Apply a trained LoRA to photos: find the faces, edit each aligned crop, paste it back."""
