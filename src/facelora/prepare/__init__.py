"""The data half: photos -> faces -> crops -> pairs -> captions -> validation split -> phase
datasets -> summary (plus the embedded sample data)."""
