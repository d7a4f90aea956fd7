"""Sampling: the llama.cpp sampler chain a slot samples with (`chain`), JSON schemas
as grammars (`json_schema`), and the limits that keep any grammar from crashing or
stalling llama.cpp (`grammar_bounds`).
"""
