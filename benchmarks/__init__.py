"""Evaluation suites, lm-eval task YAMLs over shipped data, and judging adapters."""
