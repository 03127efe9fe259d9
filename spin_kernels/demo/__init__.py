"""The embedded demo: SPIN on random Markov chains (a known p_data) with a tiny Llama on CPU."""

from .run import DemoConfig, demo_spin_defaults, run_demo
from .task import MarkovTask, sequence_kl

__all__ = ["DemoConfig", "MarkovTask", "demo_spin_defaults", "run_demo", "sequence_kl"]
