"""The DeepSpeed engine under torchrun: real ZeRO over gloo with 2 CPU processes (slow)."""
