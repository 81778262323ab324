"""`python -m incrkern.bench [kernels|convergence|finetune|all] [--quick|--full] [--device ...]`.

Kernel benchmarks (incrkern.bench.kernels) time every incrkern kernel against its torch
counterpart in the same run and against the copy bandwidth measured in that run; the
convergence benchmark (incrkern.bench.convergence) trains on scikit-learn's digits;
the fine-tuning benchmark (incrkern.bench.finetune, only when named) fine-tunes a
pretrained sentence encoder with sparse masks, LoRA and dense AdamW.
`run_bench` writes a JSON file, a markdown summary and PNG plots.
"""
from .cli import main, run_bench

__all__ = ["main", "run_bench"]
