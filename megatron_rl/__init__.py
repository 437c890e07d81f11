"""megatron_rl: RL and SFT post-training of MoE LLMs on Megatron-Core.

Importing the package is cheap: it pulls in no torch, Megatron or optional backend.
"""

__version__ = "0.1.0"
