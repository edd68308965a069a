"""Face detection, landmarks, embeddings (pluggable backends), head pose, alignment and crops."""
