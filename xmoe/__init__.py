"""xmoe: DeepSeek-style Mixture-of-Experts training with padding-free, redundancy-bypassing
and sequence-sharded expert parallelism (the X-MoE techniques), on DeepSpeed."""

__version__ = "0.1.0"
