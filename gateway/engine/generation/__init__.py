"""Text generation: the queue and hand-off (engine.py), continuous batching (scheduler.py), the
forward pass behind a StepModel (step.py, hf_step.py, fused_llama.py) and what becomes of its logits
(output.py, sampling.py, top_tokens.py)."""
