"""Speed, memory and agreement of the exported model against plain PyTorch (`make bench`)."""
