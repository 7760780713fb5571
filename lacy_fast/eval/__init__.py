"""Evaluation: FactScore, fact leakage, call statistics, perplexity, reports and plots."""
