"""The controller's networks: budget encoder, the two stage predictors, the hierarchical actor."""
from policies.budget_encoder import ElapsedCode, LatencyBudgetEncoder, sinusoidal_code
from policies.controller import HierarchicalController
from policies.predictors import STAGE2_INPUTS, Knob1PredictorBudgetLanguage, Knob2Knob3Predictor

__all__ = [
    "STAGE2_INPUTS",
    "ElapsedCode",
    "HierarchicalController",
    "Knob1PredictorBudgetLanguage",
    "Knob2Knob3Predictor",
    "LatencyBudgetEncoder",
    "sinusoidal_code",
]
