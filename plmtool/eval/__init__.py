"""Evaluation: token-level perplexity, lm-eval zero-shot (incl. the offline wiki_next_sentence task)."""
