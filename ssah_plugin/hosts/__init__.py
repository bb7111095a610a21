"""Hosts that enforce a mask during training: transformers Trainer, torch optimizers, DeepSpeed, PEFT."""
