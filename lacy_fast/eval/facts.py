"""Moved to ``lacy_fast.data.facts`` (the fact table is data: the oracle big model of the
cascade reads it too); these names stay importable from here."""
from lacy_fast.data.facts import FactTable, HeldOut, Person, StatedFact, read_heldout, value_spans

__all__ = ["FactTable", "HeldOut", "Person", "StatedFact", "read_heldout", "value_spans"]
