"""Scripts that tests start under torchrun."""
