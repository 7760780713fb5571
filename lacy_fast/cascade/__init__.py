"""SLM + big-model generation: the SLM decodes and calls a bigger model where it emits <CALL>."""
from lacy_fast.cascade.big import BigModel, HFBig, LacyBig, OracleBig, load_big
from lacy_fast.cascade.engine import Cascade, Generation, summarize
from lacy_fast.cascade.rules import ArgmaxRule, BudgetRule, NeverRule, ThresholdRule, make_rule
from lacy_fast.cascade.slm import ExportedModel, load_model

__all__ = ["ArgmaxRule", "BigModel", "BudgetRule", "Cascade", "ExportedModel", "Generation", "HFBig", "LacyBig",
           "NeverRule", "OracleBig", "ThresholdRule", "load_big", "load_model", "make_rule", "summarize"]
