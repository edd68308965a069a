"""Synthesized training pairs: restoration, swap and model edits, scored by a VLM."""
