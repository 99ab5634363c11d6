"""sparse-ft: p-sparse parameter-efficient fine-tuning (Fu et al., AAAI 2023) on real transformers."""

__version__ = "0.1.0"
