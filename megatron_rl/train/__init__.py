"""Training loops (sft.py; grpo.py later) and the shared Megatron machinery (engine.py)."""
