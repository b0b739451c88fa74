"""Fine-tuning: task recipes (classify, qa) and methods that transform a model before training (top-k freezing)."""
