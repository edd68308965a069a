"""Files and tables: atomic writes, parquet tables, safetensors, names, shards, workers, progress,
and the phase-folder (Kontext) dataset format every stage reads."""
