"""Training stage: architectures by name, RED blocks, and the distillation trainer."""
