"""Each modality's measures: ``video`` (per-frame FD, temporal consistency, motion smoothness),
``audio`` (spoken-digit classifier: accuracy and FD in its features), ``actions`` (success rate
over seeded episodes)."""
