"""Distillation: baseline losses and their registry (the trainer comes with the distill stage)."""
