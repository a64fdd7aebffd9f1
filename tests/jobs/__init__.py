"""Each stage entry point run as a real job (torchrun, run folders on disk) (slow)."""
