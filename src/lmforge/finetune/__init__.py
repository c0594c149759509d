"""Fine-tuning: task features, batches, LoRA and parameter freezing."""
