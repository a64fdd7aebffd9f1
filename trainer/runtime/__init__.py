"""What runs a training job: process group, the DeepSpeed engine (the only deepspeed import),
checkpoints, EMA, learning rate, preemption, the training loop and the metrics writer.
"""
