"""incrkern.finetune: calibrated masks against plain torch, given masks in the
optimizers, the optimizer step inside backward, sparse deltas."""
import copy
import importlib.util
import math

import pytest
import torch
from torch import nn

import incrkern
from incrkern.finetune import (OptimizerInBackward, apply_delta, delta_nbytes, fish_mask,
                               load_delta, make_delta, random_mask, save_delta, sift_mask)


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 10, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(n)]


def loss_of(model):
    return lambda batch: nn.functional.cross_entropy(model(batch[0]), batch[1])


def reference_scores(model, batches, reduce):
    """Plain torch: per-batch gradients by autograd.grad, reduced in float64."""
    params = list(model.parameters())
    grads = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        grads.append([g.double() for g in torch.autograd.grad(loss, params)])
    out = []
    for i in range(len(params)):
        gs = torch.stack([g[i] for g in grads])
        out.append({"sq_sum": (gs * gs).sum(0), "sum_abs": gs.abs().sum(0),
                    "abs_sum": gs.sum(0).abs()}[reduce])
    return params, out


def reference_top(scores, density, scope):
    """Top-k by a stable sort (ties to the lowest position), ascending positions."""
    if scope == "tensor":
        out = []
        for s in scores:
            k = math.ceil(density * s.numel())
            order = torch.sort(s.reshape(-1), descending=True, stable=True).indices
            out.append(order[:k].sort().values)
        return out
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = math.ceil(density * flat.numel())
    chosen = torch.sort(flat, descending=True, stable=True).indices[:k]
    out, start = [], 0
    for s in scores:
        mine = chosen[(chosen >= start) & (chosen < start + s.numel())] - start
        out.append(mine.sort().values)
        start += s.numel()
    return out


@pytest.mark.parametrize("kind", ["fish", "sift", "sift_sum_abs"])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_masks_match_plain_torch(kind, scope):
    model = tiny_model()
    batches = data(5)
    density = 0.1
    if kind == "fish":
        masks = fish_mask(model, iter(batches), loss_of(model), density, scope=scope,
                          num_batches=3)
        reduce = "sq_sum"
    else:
        reduce = "abs_sum" if kind == "sift" else "sum_abs"
        masks = sift_mask(model, batches, loss_of(model), density, scope=scope,
                          num_batches=3, reduce=reduce)
    params, scores = reference_scores(model, batches[:3], reduce)
    expected = reference_top(scores, density, scope)
    assert list(masks) == params
    for p, want in zip(params, expected):
        assert masks[p].dtype == torch.int64
        # fp32 accumulation may swap two near-equal scores at the k-th place
        assert len(set(masks[p].tolist()) ^ set(want.tolist())) <= 2
        assert torch.equal(masks[p], masks[p].sort().values)
    total = sum(m.numel() for m in masks.values())
    n = sum(p.numel() for p in params)
    if scope == "global":
        assert total == math.ceil(density * n)
    else:
        assert total == sum(math.ceil(density * p.numel()) for p in params)


def test_masks_ties_go_to_the_lowest_position_and_grads_are_kept():
    w = torch.zeros(10, requires_grad=True)
    w.grad = torch.full((10,), 7.0)
    # the gradient is 1 at every position: all scores tie
    masks = fish_mask([w], [None, None], lambda _: w.sum(), 0.3)
    assert masks[w].tolist() == [0, 1, 2]
    assert torch.equal(w.grad, torch.full((10,), 7.0))


def test_masks_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="density"):
        fish_mask(model, data(1), loss_of(model), 0.0)
    with pytest.raises(ValueError, match="scope"):
        sift_mask(model, data(1), loss_of(model), 0.1, scope="row")
    with pytest.raises(ValueError, match="reduce"):
        sift_mask(model, data(1), loss_of(model), 0.1, reduce="max")
    with pytest.raises(ValueError, match="no calibration batch"):
        fish_mask(model, [], loss_of(model), 0.1)
    with pytest.raises(ValueError, match="num_batches"):
        fish_mask(model, data(1), loss_of(model), 0.1, num_batches=0)
    with pytest.raises(TypeError, match=r"params\[1\] must be a floating point tensor"):
        random_mask([torch.zeros(3), torch.zeros(3, dtype=torch.long)], 0.1)
    with pytest.raises(ValueError, match="no param that requires grad"):
        random_mask([torch.zeros(3)], 0.1)


def train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_given_mask_trains_only_its_positions(name):
    model = tiny_model()
    masks = sift_mask(model, data(2), loss_of(model), 0.05)
    start = [p.detach().clone() for p in model.parameters()]
    kwargs = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    opt = getattr(incrkern.optim, name)(model.parameters(), mask=masks, **kwargs)
    assert opt.param_groups[0]["mask"] == "fixed"
    train(model, opt, data(4))
    for p, s in zip(model.parameters(), start):
        changed = (p.detach() != s).reshape(-1).nonzero().squeeze(1)
        assert set(changed.tolist()) <= set(masks[p].tolist())
        assert changed.numel() > 0
        state = opt.state[p]
        assert torch.equal(state["indices"].long(), masks[p])
        assert state["indices"].dtype == torch.int32
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in state:
                assert state[key].numel() == masks[p].numel()


def test_given_mask_equals_the_same_mask_selected():
    """A given mask is a fixed mask: the same positions give the same training."""
    model = tiny_model()
    twin = copy.deepcopy(model)
    opt = incrkern.optim.AdamW(model.parameters(), lr=0.01, density=0.1, mask="fixed")
    batches = data(5)
    train(model, opt, batches[:1])
    masks = {q: opt.state[p]["indices"].long() for p, q in
             zip(model.parameters(), twin.parameters())}
    # replay the first step's selection on the twin, then both go on alike
    twin_opt = incrkern.optim.AdamW(twin.parameters(), lr=0.01, mask=masks)
    train(twin, twin_opt, batches[:1])
    train(model, opt, batches[1:])
    train(twin, twin_opt, batches[1:])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_given_mask_state_dict_round_trip():
    model = tiny_model()
    masks = random_mask(model, 0.1, generator=torch.Generator().manual_seed(5))
    opt = incrkern.optim.Adam(model.parameters(), lr=0.01, mask=masks)
    batches = data(6)
    train(model, opt, batches[:3])
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    # a fresh optimizer over the same params with no mask given: the state_dict
    # brings the positions back
    opt2 = incrkern.optim.Adam(twin.parameters(), lr=0.01, mask="fixed", density=1.0)
    opt2.load_state_dict(saved)
    for p in twin.parameters():
        assert opt2.state[p]["indices"].dtype == torch.int32
    train(model, opt, batches[3:])
    train(twin, opt2, batches[3:])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["indices"], opt2.state[q]["indices"])


def test_set_mask_sorts_and_accepts_empty_and_int32():
    p = torch.randn(20, requires_grad=True)
    q = torch.randn(4, 5, requires_grad=True)
    opt = incrkern.optim.AdamW([p, q], lr=0.1)
    opt.param_groups[0]["mask"] = "fixed"
    opt.set_mask({p: torch.tensor([7, 2, 11]), q: torch.empty(0, dtype=torch.int32)})
    assert opt.state[p]["indices"].tolist() == [2, 7, 11]
    p0, q0 = p.detach().clone(), q.detach().clone()
    p.grad, q.grad = torch.randn(20), torch.randn(4, 5)
    opt.step()
    assert (p != p0).nonzero().squeeze(1).tolist() == [2, 7, 11]
    assert torch.equal(q, q0)


def bad_masks(p, q):
    yield {p: [1, 2], q: torch.tensor([0])}, TypeError, "must be a tensor"
    yield {p: torch.tensor([1.0]), q: torch.tensor([0])}, TypeError, "int32 or int64"
    yield {p: torch.tensor([[1]]), q: torch.tensor([0])}, ValueError, "1-D"
    yield {p: torch.tensor([1, 20]), q: torch.tensor([0])}, ValueError, "outside.*20"
    yield {p: torch.tensor([-1]), q: torch.tensor([0])}, ValueError, "outside"
    yield {p: torch.tensor([3, 3]), q: torch.tensor([0])}, ValueError, "twice"
    yield {p: torch.tensor([1])}, ValueError, r"\['params'\]\[1\] has no mask"
    yield {p: torch.tensor([1]), q: torch.tensor([0]), torch.zeros(3): torch.tensor([0])}, \
        ValueError, "not a param"


def test_bad_masks_raise_and_touch_nothing():
    p = torch.randn(20, requires_grad=True)
    q = torch.randn(4, 5, requires_grad=True)
    opt = incrkern.optim.AdamW([p, q], lr=0.1, mask="fixed")
    for masks, error, match in bad_masks(p, q):
        with pytest.raises(error, match=match):
            opt.set_mask(masks)
        assert not opt.state
    with pytest.raises(ValueError, match="masks\\[param_groups\\[0\\]\\['params'\\]\\[0\\]\\]"):
        incrkern.optim.AdamW([p, q], mask={p: torch.tensor([50]), q: torch.tensor([0])})
    dynamic = incrkern.optim.AdamW([p, q], lr=0.1)
    with pytest.raises(ValueError, match="mask='fixed'"):
        dynamic.set_mask({p: torch.tensor([1]), q: torch.tensor([0])})
    p.grad, q.grad = torch.randn(20), torch.randn(4, 5)
    opt.step()
    with pytest.raises(RuntimeError, match="already has optimizer state"):
        opt.set_mask({p: torch.tensor([1]), q: torch.tensor([0])})


# -- the optimizer step inside backward ----------------------------------------------

def in_backward_factory(kind, masks=None):
    def factory(params):
        if kind == "torch":
            return torch.optim.AdamW(params, lr=0.01)
        mine = {p: masks[p] for p in params}
        return incrkern.optim.AdamW(params, lr=0.01, mask=mine)
    return factory


@pytest.mark.parametrize("kind", ["torch", "incrkern-mask"])
def test_optimizer_in_backward_equals_a_normal_loop(kind):
    model = tiny_model()
    twin = copy.deepcopy(model)
    batches = data(5)
    masks = fish_mask(model, batches[:2], loss_of(model), 0.1, scope="global")
    twin_masks = {q: masks[p] for p, q in zip(model.parameters(), twin.parameters())}
    if kind == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    else:
        opt = incrkern.optim.AdamW(model.parameters(), lr=0.01, mask=masks)
    train(model, opt, batches)

    peak = [0]

    def count_live(_):  # registered first, so it runs before the step frees the grad
        peak[0] = max(peak[0], sum(p.grad.numel() * p.grad.element_size()
                                   for p in twin.parameters() if p.grad is not None))
    for p in twin.parameters():
        p.register_post_accumulate_grad_hook(count_live)
    in_backward = OptimizerInBackward(twin, in_backward_factory(kind, twin_masks))
    sched = torch.optim.lr_scheduler.LambdaLR(in_backward, lambda step: 1.0)
    for x, y in batches:
        in_backward.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        assert all(p.grad is None for p in twin.parameters())
        in_backward.step()
        sched.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    all_grads = sum(p.numel() * p.element_size() for p in twin.parameters())
    largest = max(p.numel() * p.element_size() for p in twin.parameters())
    assert peak[0] == largest < all_grads


def test_optimizer_in_backward_scheduler_and_state_dict():
    model = tiny_model()
    opt = OptimizerInBackward(model, lambda ps: incrkern.optim.SGD(ps, lr=0.1))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, data(1))
    sched.step()
    assert all(o.param_groups[0]["lr"] == 0.05 for o in opt.optimizers.values())
    saved = opt.state_dict()
    twin = OptimizerInBackward(copy.deepcopy(model), lambda ps: incrkern.optim.SGD(ps, lr=1.0))
    twin.load_state_dict(saved)
    assert [g["lr"] for g in twin.param_groups] == [0.05] * 4
    with pytest.raises(TypeError, match="torch Optimizer"):
        OptimizerInBackward(model, lambda ps: None)


# -- sparse deltas ----------------------------------------------------------------

needs_safetensors = pytest.mark.skipif(
    importlib.util.find_spec("safetensors") is None,
    reason="safetensors is not installed (pip install incrkern[finetune])")


@needs_safetensors
def test_delta_round_trip_is_exact(tmp_path):
    base = tiny_model()
    model = copy.deepcopy(base)
    masks = random_mask(model, 0.1, generator=torch.Generator().manual_seed(2))
    opt = incrkern.optim.AdamW(model.parameters(), lr=0.05, mask=masks)
    train(model, opt, data(3))
    path = tmp_path / "delta.safetensors"
    size = save_delta(model, base.state_dict(), str(path))
    delta = load_delta(str(path))
    changed = sum(idx.numel() for idx, _, _ in delta.values())
    assert 0 < changed <= sum(m.numel() for m in masks.values())
    for idx, values, _ in delta.values():
        assert idx.dtype == torch.int32 and values.dtype == torch.float32
    # about 8 bytes per stored position, plus the header
    assert size == delta_nbytes(str(path))
    assert 8 * changed <= size <= 8 * changed + 2048
    assert delta_nbytes(delta) == 8 * changed
    restored = copy.deepcopy(base)
    apply_delta(restored, str(path))
    for p, q in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(p, q)
    # masks given: exactly those positions are stored
    size_masked = save_delta(model, base, str(tmp_path / "m.safetensors"), masks=masks)
    delta_masked = load_delta(str(tmp_path / "m.safetensors"))
    for (name, p) in model.named_parameters():
        assert torch.equal(delta_masked[name][0].long(), masks[p])
    assert size_masked >= size


@needs_safetensors
def test_two_deltas_on_different_positions(tmp_path):
    base = tiny_model()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        a[0].weight.view(-1)[:5] += 1.0
        b[0].weight.view(-1)[10:13] -= 2.0
        b[2].bias[1] = 3.0
    save_delta(a, base, str(tmp_path / "a.safetensors"))
    save_delta(b, base, str(tmp_path / "b.safetensors"))
    both = copy.deepcopy(base)
    apply_delta(both, load_delta(str(tmp_path / "a.safetensors")))
    apply_delta(both, str(tmp_path / "b.safetensors"))
    expected = copy.deepcopy(base)
    with torch.no_grad():
        expected[0].weight.view(-1)[:5] += 1.0
        expected[0].weight.view(-1)[10:13] -= 2.0
        expected[2].bias[1] = 3.0
    for p, q in zip(both.state_dict().values(), expected.state_dict().values()):
        assert torch.equal(p, q)
    assert set(make_delta(b, base)) == {"0.weight", "2.bias"}


@needs_safetensors
def test_bad_delta_touches_nothing(tmp_path):
    base = tiny_model()
    model = copy.deepcopy(base)
    good = (torch.tensor([0], dtype=torch.int32), torch.tensor([5.0]), (16, 10))
    bad = [({"0.weight": good, "nope": good}, "no tensor 'nope'"),
           ({"0.weight": good, "2.bias": good}, "shape"),
           ({"0.weight": (good[0], good[1].double(), good[2])}, "float64"),
           ({"0.weight": good, "2.bias": (torch.tensor([4]), torch.tensor([1.0]), (4,))},
            "outside")]
    for delta, match in bad:
        with pytest.raises(ValueError, match=match):
            apply_delta(model, delta)
        for p, q in zip(model.state_dict().values(), base.state_dict().values()):
            assert torch.equal(p, q)
    path = tmp_path / "other.safetensors"
    import safetensors.torch
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="not an incrkern delta"):
        load_delta(str(path))
