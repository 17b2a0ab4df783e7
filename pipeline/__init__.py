"""The training side: DVC stages that fine-tune and export, and the tools around them."""
