"""The training side: pure losses, packing pairs into rows, log-probs, the update loop, the
optimizer and LoRA. Nothing here knows about rounds or run directories."""
