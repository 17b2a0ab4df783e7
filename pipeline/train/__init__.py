"""Fine-tuning helpers: optimiser, training files, tracking gaps, vocabulary extension."""
