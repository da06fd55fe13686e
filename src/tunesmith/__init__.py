"""tunesmith: fine-tune and align language models from one YAML file."""

__version__ = "0.1.0"
