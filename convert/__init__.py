"""Reading and writing quantized checkpoints: our per-layer format, foreign ones, the converter."""
