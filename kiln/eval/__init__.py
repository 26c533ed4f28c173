"""Accuracy measurement: `kiln summarize` (summarize.py's loop and ROUGE) and `kiln perplexity` (rolling windows),
each beside transformers. Modules: rouge, datasets (the shipped ACLSum subset, cnn_dailymail, JSONL), perplexity,
summarize, hf_reference (transformers from the checkpoint directory, without remote code)."""
