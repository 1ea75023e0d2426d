"""Ray actors: vLLM rollout, DeepSpeed trainers, weight sync, and the losses they train with."""
