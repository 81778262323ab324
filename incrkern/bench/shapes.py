"""Parameter shapes the kernel benchmarks run on, and their sizes per mode.

The quick and full sizes below are floors. A run takes them from the last-level cache
(`sizes_for(..., cache=...)`): every case's working set, the distinct bytes its kernels
touch, is at least CACHE_FACTOR times that cache, so that the figures measure memory,
not a cache that holds the whole case (a 10M-element AdamW step, 160 MB, fits in a
260 MB L3)."""
import dataclasses
import math
from dataclasses import dataclass, field

CACHE_FACTOR = 4
# Working-set bytes per element, the least among the cases on each shape set: the step
# shapes also carry accumulate (the accumulator and g, fp32; SGD with momentum has 12,
# AdamW 16), the selection shapes only the scores.
STEP_BYTES = 8
SELECT_BYTES = 4
COPY_BYTES = 8  # the copy probe's source and destination
# The most a case may hold at once, per element of its size (params, grads, states, a
# reference's copies: a 5e8-element selection peaked at 17 GB), against MEMORY_SHARE
# of the machine's memory: a machine whose cache asks for more gets smaller cases, and
# its report says so.
PEAK_BYTES = 32
MEMORY_SHARE = 0.7


def most_elements(memory_bytes, peak_bytes=PEAK_BYTES):
    """The most elements a case of `peak_bytes` an element may have within MEMORY_SHARE
    of `memory_bytes` (None: no limit, math.inf)."""
    return math.inf if memory_bytes is None else int(MEMORY_SHARE * memory_bytes / peak_bytes)


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
    # the fewest timed calls a torch selection row gets once its calls add up to
    # max_time_s (incrkern's rows and the dense references get 3): torch.topk of 10^8
    # elements takes seconds a call
    selection_reference_repeats: int = 3
    densities: tuple = (1.0, 0.1, 0.01, 0.001)
    state_transformer: dict = field(default_factory=lambda: dict(layers=2, hidden=64,
                                                                 vocab=1000, positions=64))
    # the selection cases' transformer list (None: `transformer`)
    select_transformer: dict = None
    # where the sizes came from: {"llc_bytes", "llc_source", "cache_factor",
    # "memory_capped"}, or None
    cache: dict = None

    def shape_sets(self):
        return {
            "one_tensor": [(self.one_tensor,)],
            "many_small": [(self.many_numel,)] * self.many_count,
            "transformer": transformer_shapes(**self.transformer),
        }

    def select_shapes(self):
        return transformer_shapes(**(self.select_transformer or self.transformer))

    def for_cache(self, llc_bytes, llc_source="", factor=CACHE_FACTOR, memory_bytes=None):
        """These sizes grown until every case's working set is at least `factor` times
        a last-level cache of `llc_bytes`: the step and accumulate shapes to
        factor * llc / STEP_BYTES elements (each set: one tensor, a count of
        many_numel-element tensors, the transformer's width), the selections'
        to factor * llc / SELECT_BYTES, the copy probe to factor * llc / COPY_BYTES;
        none beyond what `memory_bytes` of memory holds (see PEAK_BYTES)."""
        most = most_elements(memory_bytes)
        step_wanted = math.ceil(factor * llc_bytes / STEP_BYTES)
        select_wanted = math.ceil(factor * llc_bytes / SELECT_BYTES)
        step = max(self.one_tensor, min(step_wanted, most))
        select = max(max(self.select_sizes), min(select_wanted, most))
        return dataclasses.replace(
            self, one_tensor=step,
            many_count=max(self.many_count, math.ceil(step / self.many_numel)),
            transformer=transformer_at_least(self.transformer, step),
            select_sizes=(select,),
            select_transformer=transformer_at_least(self.transformer, select),
            copy_numel=max(self.copy_numel, math.ceil(factor * llc_bytes / COPY_BYTES)),
            cache=dict(llc_bytes=int(llc_bytes), llc_source=llc_source, cache_factor=factor,
                       memory_capped=step < step_wanted or select < select_wanted))


def transformer_at_least(config, target):
    """`config` (transformer_shapes' arguments) with the smallest hidden width, a
    multiple of 32 and at least its own, whose list has at least `target` elements."""
    config = dict(config)
    while numel(transformer_shapes(**config)) < target:
        config["hidden"] = (config["hidden"] // 32 + 1) * 32
    return config


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
                   select_sizes=(1_000_000, 10_000_000), selection_reference_repeats=1),
    # seconds: for the smoke test only, its figures mean nothing
    "tiny": Sizes("tiny", one_tensor=20_000, many_count=8, many_numel=1000,
                  transformer=dict(layers=1, hidden=16, vocab=50, positions=16),
                  warmup=1, repeats=2, min_time_s=0.0, max_time_s=0.0, copy_numel=100_000,
                  select_sizes=(10_000,), select_fracs=(0.01, 0.1),
                  densities=(1.0, 0.1),
                  state_transformer=dict(layers=1, hidden=16, vocab=50, positions=16)),
}


def sizes_for(mode, device="cpu", cache=None, memory_bytes=None):
    """The sizes of `mode`; with `cache` = (bytes, where it was read) of the last-level
    cache, grown from it within `memory_bytes` (not the smoke test's, whose figures
    mean nothing)."""
    sizes = SIZES[mode]
    if cache is not None and mode != "tiny":
        sizes = sizes.for_cache(*cache, memory_bytes=memory_bytes)
    if mode == "full" and str(device).startswith("cuda"):
        # a GPU also gets the 1e9-element selection
        sizes = dataclasses.replace(sizes,
                                    select_sizes=sizes.select_sizes + (1_000_000_000,))
    return sizes
