"""BudgetVLM environments: the two-step latency-budget controller env and its backends."""
from envs.knobs import KnobSpace, select_blocks
