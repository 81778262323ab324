"""Parameter shapes the kernel benchmarks run on, and their sizes per mode."""
import math
from dataclasses import dataclass, field


def transformer_shapes(layers=12, hidden=768, vocab=30522, positions=512, ffn=None):
    """The parameter list of a BERT-style encoder, built by hand: word, position and
    token-type embeddings and their layer norm; per layer a fused qkv projection, the
    attention output, two feed-forward matrices (each with a bias) and two layer norms."""
    ffn = 4 * hidden if ffn is None else ffn
    shapes = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [
            (3 * hidden, hidden), (3 * hidden,),   # qkv
            (hidden, hidden), (hidden,),           # attention output
            (hidden,), (hidden,),                  # layer norm 1
            (ffn, hidden), (ffn,),                 # ffn in
            (hidden, ffn), (hidden,),              # ffn out
            (hidden,), (hidden,),                  # layer norm 2
        ]
    return shapes


def numel(shapes):
    return sum(math.prod(s) for s in shapes)


@dataclass
class Sizes:
    """Everything that differs between --quick, --full and the smoke test."""
    name: str
    one_tensor: int
    many_count: int
    many_numel: int
    transformer: dict
    warmup: int
    repeats: int
    min_time_s: float
    max_time_s: float
    copy_numel: int
    select_sizes: tuple
    select_fracs: tuple = (0.001, 0.01, 0.1)
    densities: tuple = (1.0, 0.1, 0.01, 0.001)
    state_transformer: dict = field(default_factory=lambda: dict(layers=2, hidden=64,
                                                                 vocab=1000, positions=64))

    def shape_sets(self):
        return {
            "one_tensor": [(self.one_tensor,)],
            "many_small": [(self.many_numel,)] * self.many_count,
            "transformer": transformer_shapes(**self.transformer),
        }


SIZES = {
    # the real sizes: 100M elements; 1000 x 100k; BERT-base (12 x 768, 30522 words)
    "full": Sizes("full", one_tensor=100_000_000, many_count=1000, many_numel=100_000,
                  transformer=dict(layers=12, hidden=768, vocab=30522),
                  warmup=3, repeats=10, min_time_s=0.5, max_time_s=10.0, copy_numel=100_000_000,
                  select_sizes=(1_000_000, 100_000_000)),
    # about a tenth of each, with the same tensor counts, so `make bench` takes minutes
    "quick": Sizes("quick", one_tensor=10_000_000, many_count=1000, many_numel=10_000,
                   transformer=dict(layers=12, hidden=256, vocab=3052),
                   warmup=1, repeats=5, min_time_s=0.1, max_time_s=0.8, copy_numel=32_000_000,
                   select_sizes=(1_000_000, 10_000_000)),
    # seconds: for the smoke test only, its figures mean nothing
    "tiny": Sizes("tiny", one_tensor=20_000, many_count=8, many_numel=1000,
                  transformer=dict(layers=1, hidden=16, vocab=50, positions=16),
                  warmup=1, repeats=2, min_time_s=0.0, max_time_s=0.0, copy_numel=100_000,
                  select_sizes=(10_000,), select_fracs=(0.01, 0.1),
                  densities=(1.0, 0.1),
                  state_transformer=dict(layers=1, hidden=16, vocab=50, positions=16)),
}


def sizes_for(mode, device="cpu"):
    sizes = SIZES[mode]
    if mode == "full" and str(device).startswith("cuda"):
        # a GPU also gets the 1e9-element selection
        sizes = Sizes(**{**sizes.__dict__,
                         "select_sizes": sizes.select_sizes + (1_000_000_000,)})
    return sizes
