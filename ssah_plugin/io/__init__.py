"""Reading and writing: checkpoints, model paths, model loading."""
