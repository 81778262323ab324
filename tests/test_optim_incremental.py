"""density < 1, accumulation, error feedback, masks: incrkern.optim against the
for-loop reference of tests/reference_optim.py on a small real model."""
import copy
import itertools
import math

import pytest
import torch
from torch import nn

import incrkern
from helpers import cpu_zero_probe, hot_rows_steps
from reference_optim import ReferenceOptimizer

KINDS = {
    "SGD": ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01,
                        nesterov=False, maximize=False)),
    "Adam": ("adam", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                          decoupled_weight_decay=False, maximize=False)),
    "AdamW": ("adam", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                           decoupled_weight_decay=True, maximize=False)),
}


def torch_kwargs(name):
    kind, h = KINDS[name]
    if kind == "sgd":
        return {k: h[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")}
    return dict(lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                weight_decay=h["weight_decay"])


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                         nn.Linear(24, 5))


def batches(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g))
            for _ in range(steps)]


def train(model, opt, data, ref=None, ref_params=None):
    """Trains `model` with `opt`; the reference gets the same gradients each step."""
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if ref is not None:
            for p, q in zip(model.parameters(), ref_params):
                q.grad = p.grad.clone()
        opt.step()
        if ref is not None:
            ref.step()


MATRIX = [
    (name, select, scope, mask, n)
    for name, select, scope, mask, n in itertools.product(
        KINDS, ("grad", "grad_sq", "weight", "accumulated"), ("tensor", "global"),
        ("dynamic", "fixed", 3), (1, 3))
    if not (mask == "fixed" and select == "accumulated")
]


@pytest.mark.parametrize("name,select,scope,mask,n", MATRIX)
def test_matches_reference(name, select, scope, mask, n):
    model = small_model()
    ref_params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    options = dict(density=0.1, select=select, scope=scope, mask=mask, accumulate_steps=n)
    opt = getattr(incrkern.optim, name)(model.parameters(), **torch_kwargs(name), **options)
    kind, hyper = KINDS[name]
    ref = ReferenceOptimizer(ref_params, kind, hyper, **options)
    train(model, opt, batches(20), ref, ref_params)
    for p, q in zip(model.parameters(), ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, s in zip(model.parameters(), ref.state):
        keys = ["exp_avg", "exp_avg_sq", "momentum_buffer", "residual"]
        keys += ["indices"] if mask != "dynamic" else []  # kept only when reused
        for key in keys:
            if key in s:
                torch.testing.assert_close(opt.state[p][key].reshape(-1).to(s[key].dtype),
                                           s[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("mask", ["dynamic", "fixed"])
def test_element_bias_correction_matches_reference(mask):
    model = small_model()
    ref_params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    options = dict(density=0.05, mask=mask, bias_correction="element")
    opt = incrkern.optim.Adam(model.parameters(), **torch_kwargs("Adam"), **options)
    ref = ReferenceOptimizer(ref_params, *KINDS["Adam"], **options)
    train(model, opt, batches(15), ref, ref_params)
    for p, q in zip(model.parameters(), ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    ages = torch.cat([opt.state[p]["age"].reshape(-1) for p in model.parameters()])
    assert ages.max() > 1 and ages.dtype == torch.int32


AMSGRAD_OPTIONS = [
    dict(select="grad"),
    dict(select="grad", mask="fixed"),
    dict(select="grad_sq", scope="global", mask=3, accumulate_steps=3),
    dict(select="accumulated"),
    dict(select="weight", bias_correction="element"),
]


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("options", AMSGRAD_OPTIONS)
def test_amsgrad_matches_reference(name, options):
    """amsgrad=True at density < 1: max_exp_avg_sq is lazy like the moments (only chosen
    elements change it; k long with a fixed mask), and amsgrad groups do not take the
    fused select-and-update (it keeps no maximum)."""
    model = small_model()
    ref_params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    options = dict(options, density=0.1)
    opt = getattr(incrkern.optim, name)(model.parameters(), **torch_kwargs(name),
                                        amsgrad=True, **options)
    ref = ReferenceOptimizer(ref_params, *KINDS[name], amsgrad=True, **options)
    train(model, opt, batches(12), ref, ref_params)
    for p, q in zip(model.parameters(), ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, s in zip(model.parameters(), ref.state):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key].reshape(-1), s[key], rtol=1e-5,
                                       atol=1e-6, msg=key)
        k = math.ceil(0.1 * p.numel())
        expected = k if options.get("mask") == "fixed" else p.numel()
        assert opt.state[p]["max_exp_avg_sq"].numel() == expected
        # the largest second moment so far: never below the current one
        assert bool((opt.state[p]["max_exp_avg_sq"] >= opt.state[p]["exp_avg_sq"]).all())


@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("select", ["grad", "grad_sq", "weight", "accumulated", "random"])
def test_only_chosen_elements_change(name, select):
    model = small_model()
    # mask=1 reselects every update and keeps the indices in the state to inspect
    amsgrad = dict(amsgrad=True) if name == "Adam" else {}
    opt = getattr(incrkern.optim, name)(model.parameters(), **torch_kwargs(name),
                                        density=0.1, select=select, mask=1, **amsgrad)
    data = batches(4)
    train(model, opt, data[:2])
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    train(model, opt, data[2:3])
    for i, (p, b) in enumerate(zip(model.parameters(), before)):
        idx = opt.state[p]["indices"]
        assert idx.numel() == math.ceil(0.1 * p.numel())
        changed = (p.detach().reshape(-1) != b.reshape(-1)).nonzero().squeeze(1)
        assert set(changed.tolist()) <= set(idx.tolist())
        unchosen = torch.ones(p.numel(), dtype=torch.bool)
        unchosen[idx] = False
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            if key in state_before[i]:
                now = opt.state[p][key].reshape(-1)[unchosen]
                assert torch.equal(now, state_before[i][key].reshape(-1)[unchosen]), key


def test_error_feedback_drops_nothing():
    """Plain SGD with select='accumulated': params moved + lr * residual = lr * sum(g)."""
    model = small_model()
    start = [p.detach().clone() for p in model.parameters()]
    lr = 0.1
    opt = incrkern.optim.SGD(model.parameters(), lr=lr, density=0.05, select="accumulated")
    total = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in batches(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for t, p in zip(total, model.parameters()):
            t += p.grad
        opt.step()
    for p, s, t in zip(model.parameters(), start, total):
        moved = s - p.detach()
        residual = opt.state[p]["residual"].view_as(p)
        torch.testing.assert_close(moved + lr * residual, lr * t, rtol=1e-5, atol=1e-6)
        assert residual.abs().sum() > 0  # some mass is still waiting


@pytest.mark.parametrize("name", list(KINDS))
def test_accumulate_steps_equals_one_step_on_the_mean(name):
    model = small_model()
    twin = copy.deepcopy(model)
    n = 4
    opt = getattr(incrkern.optim, name)(model.parameters(), **torch_kwargs(name),
                                        accumulate_steps=n)
    ref = getattr(torch.optim, name)(twin.parameters(), **torch_kwargs(name), foreach=False)
    data = batches(2 * n)
    for cycle in range(2):
        grads = [torch.zeros_like(p) for p in twin.parameters()]
        for call in range(n):
            x, y = data[cycle * n + call]
            assert opt.accumulating == (call < n - 1)
            before = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            for g, p in zip(grads, model.parameters()):
                g += p.grad
            opt.step()
            if call < n - 1:  # accumulating: no param changes
                assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        for p, g in zip(twin.parameters(), grads):
            p.grad = g / n
        ref.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def state_bytes(opt):
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))


def test_fixed_mask_state_scales_with_k():
    p = torch.randn(100_000, requires_grad=True)
    opt = incrkern.optim.AdamW([p], lr=1e-3, density=0.01, mask="fixed")
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    k = math.ceil(0.01 * p.numel())
    assert opt.state[p]["indices"].numel() == k
    assert state_bytes(opt) <= 16 * k + 64  # indices + exp_avg + exp_avg_sq + step
    dense = incrkern.optim.AdamW([p], lr=1e-3)
    dense.step()
    assert state_bytes(opt) <= 0.02 * state_bytes(dense)


def test_fixed_mask_never_moves_other_elements():
    p = torch.randn(1000, requires_grad=True)
    start = p.detach().clone()
    opt = incrkern.optim.SGD([p], lr=0.1, momentum=0.9, density=0.02, mask="fixed")
    for _ in range(5):
        p.grad = torch.randn_like(p)
        opt.step()
    idx = opt.state[p]["indices"]
    changed = (p.detach() != start).nonzero().squeeze(1)
    assert set(changed.tolist()) == set(idx.tolist())
    assert opt.state[p]["momentum_buffer"].numel() == idx.numel()


MODES = [
    dict(density=0.1),
    dict(density=0.1, scope="global", select="grad_sq"),
    dict(density=0.1, select="accumulated"),
    dict(density=0.1, mask="fixed"),
    dict(density=0.1, mask=2, select="weight"),
    dict(density=0.1, accumulate_steps=3),
    dict(density=0.1, bias_correction="element"),
    dict(density=0.2, select="layer"),
    dict(density=0.1, mask="fixed", amsgrad=True),
]


@pytest.mark.parametrize("options", MODES)
@pytest.mark.parametrize("split", [4, 5])  # 5: in the middle of an accumulation cycle
def test_state_dict_round_trip_in_every_mode(options, split):
    model = small_model()
    opt = incrkern.optim.Adam(model.parameters(), lr=1e-2, **options)
    data = batches(10)
    torch.manual_seed(3)
    train(model, opt, data[:split])
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    opt2 = incrkern.optim.Adam(twin.parameters(), lr=1e-2, **options)
    opt2.load_state_dict(saved)
    rng = torch.get_rng_state()
    train(model, opt, data[split:])
    torch.set_rng_state(rng)
    train(twin, opt2, data[split:])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("options", MODES)
def test_bad_grad_touches_nothing(options):
    model = small_model()
    opt = incrkern.optim.AdamW(model.parameters(), lr=1e-2, **options)
    train(model, opt, batches(2))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].grad.set_(torch.randn(3))
    before = copy.deepcopy((params, opt.state_dict()))
    with pytest.raises(RuntimeError, match="grad has shape"):
        opt.step()
    for p, q in zip(params, before[0]):
        assert torch.equal(p, q)
    after = opt.state_dict()
    assert after["param_groups"] == before[1]["param_groups"]
    for k, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, after["state"][k][key]), key


def test_bad_options():
    params = list(small_model().parameters())
    with pytest.raises(ValueError, match="mask='fixed' cannot be combined"):
        incrkern.optim.SGD(params, lr=0.1, mask="fixed", select="accumulated", density=0.1)
    with pytest.raises(ValueError, match="momentum_correction"):
        incrkern.optim.SGD(params, lr=0.1, momentum_correction=True)
    with pytest.raises(ValueError, match="density"):
        incrkern.optim.SGD([{"params": params, "density": 2.0}], lr=0.1)
    with pytest.raises(TypeError, match="unexpected"):
        incrkern.optim.SGD(params, lr=0.1, densty=0.1)


@pytest.mark.parametrize("shape", [(500,), (20, 25)])
def test_momentum_correction_is_dgc(shape):
    """Deep Gradient Compression: u = m u + g; v += u; apply top-k of |v|; clear v and u
    where applied (flat positions, also for a matrix)."""
    torch.manual_seed(0)
    p = torch.randn(shape, requires_grad=True)
    q = p.detach().clone().view(-1)
    m, lr, density = 0.9, 0.1, 0.05
    opt = incrkern.optim.SGD([p], lr=lr, momentum=m, density=density, select="accumulated",
                             momentum_correction=True)
    u, v = torch.zeros(500), torch.zeros(500)
    k = math.ceil(density * 500)
    for _ in range(6):
        g = torch.randn(500)
        p.grad = g.clone().view(shape)
        opt.step()
        u = m * u + g
        v = v + u
        idx = torch.sort(v.abs(), descending=True, stable=True).indices[:k]
        q[idx] -= lr * v[idx]
        v[idx] = 0
        u[idx] = 0
    torch.testing.assert_close(p.detach().view(-1), q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["residual"].view(-1), v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["velocity"].view(-1), u, rtol=1e-5, atol=1e-6)


def test_layer_selection_updates_whole_tensors():
    model = small_model()
    opt = incrkern.optim.AdamW(model.parameters(), lr=1e-2, density=0.3, select="layer")
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    for x, y in batches(5):
        before = [p.detach().clone() for p in params]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        moved = [not torch.equal(p, b) for p, b in zip(params, before)]
        for p, b, m in zip(params, before, moved):
            if m:  # a chosen tensor moves as a whole (Adam moves every element)
                assert bool((p != b).all())
        assert sum(p.numel() for p, m in zip(params, moved) if m) >= 0.3 * total
        assert not all(moved)


def test_random_selection_is_reproducible():
    def run():
        model = small_model()
        torch.manual_seed(5)
        opt = incrkern.optim.SGD(model.parameters(), lr=0.1, density=0.1, select="random")
        train(model, opt, batches(3))
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_approx_selection_updates_about_k():
    p = torch.randn(200_000, requires_grad=True)
    start = p.detach().clone()
    opt = incrkern.optim.SGD([p], lr=0.1, density=0.01, topk="approx")
    p.grad = torch.randn_like(p)
    opt.step()
    changed = int((p.detach() != start).sum())
    assert abs(changed - 2000) <= 0.01 * 2000 + 1


@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("options", [
    dict(select="grad"), dict(select="accumulated"), dict(select="grad", accumulate_steps=2),
    dict(select="grad_sq", scope="global"), dict(select="weight", mask=2),
])
def test_mask_and_position_forms_agree(monkeypatch, name, options):
    """From MASK_DENSITY on, a CPU step updates through a bool mask instead of the
    chosen positions. Both forms give the same params and state to fp32 rounding (the
    streaming mask loop is compiled with FMA where the CPU has it, the positional one
    is not: a few ulp apart), and each form is the one asked for."""
    import incrkern.optim.base as base

    used = []
    for op_name in ("adam_update_", "sgd_update_"):
        op = getattr(incrkern.ops, op_name)

        def spy(*args, _op=op, **kwargs):
            used.append("masks" if kwargs.get("masks") is not None else
                        "indices" if kwargs.get("indices") is not None else "dense")
            return _op(*args, **kwargs)
        monkeypatch.setattr(incrkern.ops, op_name, spy)
    monkeypatch.setattr(base, "use_fused", lambda *args, **kwargs: False)
    results = []
    for mask_density, form in ((2.0, "indices"), (0.0, "masks")):  # never a mask; always
        monkeypatch.setattr(base, "MASK_DENSITY", mask_density)
        used.clear()
        model = small_model()
        kwargs = torch_kwargs(name)
        if name == "SGD":
            kwargs["nesterov"] = True
        else:
            kwargs["maximize"] = True
        opt = getattr(incrkern.optim, name)(model.parameters(), **kwargs, density=0.3,
                                            **options)
        for x, y in batches(6):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert used and set(used) == {form}, used
        results.append(([p.detach().clone() for p in model.parameters()],
                        copy.deepcopy(opt.state_dict()["state"])))
    (p0, s0), (p1, s1) = results
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for i in s0:
        for key, value in s0[i].items():
            if torch.is_tensor(value):
                torch.testing.assert_close(value, s1[i][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("options", [
    dict(select="grad"), dict(select="accumulated"), dict(select="grad", maximize=True),
    dict(select="grad", dtype=torch.bfloat16), dict(select="accumulated", topk="approx"),
    dict(select="grad", accumulate_steps=3), dict(select="grad", accumulate_steps=2,
                                                  topk="approx", dtype=torch.float16),
])
def test_fused_path_agrees_with_positions(monkeypatch, name, options):
    """An eligible group (CPU, |grad| or error feedback per tensor, dynamic mask) steps
    through the fused select-and-update kernel; it chooses the same elements as select
    then update by positions, and gives the same params and state to fp32 rounding,
    also when the cost model sends some of the group's tensors each way ("split")."""
    import incrkern.optim.base as base

    options = dict(options)
    dtype = options.pop("dtype", torch.float32)
    maximize = options.pop("maximize", False)
    used = []
    for op_name in ("adam_update_", "adam_select_update_"):
        op = getattr(incrkern.ops, op_name)

        def spy(*args, _op=op, _name=op_name, **kwargs):
            used.append(_name)
            return _op(*args, **kwargs)
        monkeypatch.setattr(incrkern.ops, op_name, spy)
    sizes = [2 ** 18 + 1000, 24 * 24, 5]  # one tensor takes the large (band) path
    results = []
    expected_ops = {False: {"adam_update_"}, True: {"adam_select_update_"},
                    "split": {"adam_update_", "adam_select_update_"}}
    for fused in (False, True, "split"):
        monkeypatch.setattr(base, "use_fused",
                            lambda density, numel, select="grad", rule="adam", _f=fused:
                            numel < 2 ** 18 if _f == "split" else _f)
        used.clear()
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in sizes]
        opt = getattr(incrkern.optim, name)(params, **torch_kwargs(name), maximize=maximize,
                                            density=0.02, **options)
        for _ in range(7):
            for p in params:
                z = torch.randn(p.numel(), generator=gen)
                p.grad = (z / torch.rand(p.numel(), generator=gen).add(0.05)).to(dtype)
            opt.step()
        assert used and set(used) == expected_ops[fused], used
        results.append(([p.detach().clone() for p in params],
                        copy.deepcopy(opt.state_dict()["state"])))
    (p0, s0), *others = results
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    for p1, s1 in others:
        for a, b in zip(p0, p1):
            torch.testing.assert_close(a, b, **tol)
        for i in s0:
            assert set(s0[i]) == set(s1[i])
            for key, value in s0[i].items():
                if torch.is_tensor(value):
                    torch.testing.assert_close(value, s1[i][key], rtol=1e-5, atol=1e-6,
                                               msg=key)


@pytest.mark.parametrize("select,n,hot", [("grad", 1, 40), ("grad", 3, 15),
                                          ("accumulated", 1, 40)])
def test_mostly_zero_embedding_matches_reference(select, n, hot):
    """A word embedding's gradients (nonzero in a batch's rows only, `hot` others of
    6000 each micro-step), large enough for the fused step's listing of nonzero tiles
    without a sample, and more nonzero keys than the 30 rows' worth it chooses: plain,
    at the end of each cycle of accumulate_steps, and with error feedback, against the
    reference."""
    rows, width = 6000, 384
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(rows, width, generator=gen))
    q = p.detach().clone().requires_grad_()
    options = dict(density=0.005, select=select, accumulate_steps=n)
    opt = incrkern.optim.AdamW([p], **torch_kwargs("AdamW"), **options)
    ref = ReferenceOptimizer([q], *KINDS["AdamW"], **options)
    probe = cpu_zero_probe(p.numel())
    for _ in range(6):
        g = torch.zeros(rows, width)
        g[torch.randperm(rows, generator=gen)[:hot]] = torch.randn(hot, width, generator=gen)
        assert int((g.reshape(-1)[probe] != 0).sum()) <= 12  # the probe's rule
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["exp_avg"].reshape(-1), ref.state[0]["exp_avg"],
                               rtol=1e-5, atol=1e-6)


def assert_same_steps(opts, start):
    """Two (params, optimizer) runs from the same `start` left the same params and
    state, bit for bit, and moved some param."""
    (pa, oa), (pb, ob) = opts
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        sa, sb = oa.state[a], ob.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert not all(torch.equal(a, s) for a, s in zip(pa, start))


def step_seeded(opt, params, grads):
    """opt.step() once per list of grads, torch's seed set to the step's number before
    each: a route's random score then draws the seed its twin route drew."""
    for step, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        torch.manual_seed(step)
        opt.step()


@pytest.mark.skipif(not incrkern.EXTENSION_LOADED, reason="needs the compiled extension")
@pytest.mark.parametrize("name,select", [("AdamW", "weight"), ("AdamW", "grad_sq"),
                                         ("AdamW", "random"), ("SGD", "grad"),
                                         ("Adam", "accumulated")])
@pytest.mark.parametrize("density", [0.1, 0.6])
def test_mask_route_matches_positions(name, select, density, monkeypatch):
    """From MASK_DENSITY a CPU step that the fused kernel does not take gets its bool
    masks from ops.select_mask; the same step with positions marked by index_fill_ (the
    route it replaces) leaves the same params and state, bit for bit, over steps whose
    masks differ (the kept buffer rewritten each time)."""
    from incrkern import ops
    from incrkern.optim import base
    monkeypatch.setattr(base, "FUSED_WEIGHT_DENSITY", 2.0)  # |w|: not the fused kernel
    monkeypatch.setattr(base, "FUSED_GRAD_SQ_DENSITY", 2.0)  # nor the Fisher
    monkeypatch.setattr(base, "FUSED_RANDOM_DENSITY", 2.0)  # nor the hash
    monkeypatch.setattr(base, "FUSED_SGD_DENSITY", 2.0)  # nor SGD's
    torch.manual_seed(0)
    shapes = [(300, 257), (70001,), (17,), (2, 3)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) * (i + 1) for s in shapes] for i in range(3)]
    opts, calls = [], []
    real = ops.select_mask
    monkeypatch.setattr(ops, "select_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    kwargs = dict(lr=0.01, density=density, select=select)
    if name == "SGD":
        kwargs["momentum"] = 0.9
    if select == "accumulated":
        kwargs["amsgrad"] = True  # not the fused kernel's: error feedback then composes
    for route in ("masks", "positions"):
        params = [nn.Parameter(p.clone()) for p in start]
        opt = getattr(incrkern.optim, name)(params, **kwargs)
        if route == "positions":
            opt._select_masks = lambda *a, **k: None
        step_seeded(opt, params, grads)
        opts.append((params, opt))
    assert len(calls) == len(grads)
    assert_same_steps(opts, start)


@pytest.mark.skipif(not incrkern.EXTENSION_LOADED, reason="needs the compiled extension")
@pytest.mark.parametrize("select", ["weight", "grad_sq", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.003, 0.03, 0.1, 0.5, 0.95])
def test_keyed_fused_route_matches_masks(select, dtype, density, monkeypatch):
    """A CPU step with select="weight" (ops.adam_select_update_(score="weight")),
    "grad_sq" (the Fisher accumulated first, then score="grad_sq", scores=Fishers) or
    "random" (the seed drawn as select draws it) takes the fused call; the same steps
    through select's positions or select_mask and the masked update (the routes it
    replaces) leave the same params and state, Fishers included, bit for bit, on
    tensors past one block (one an embedding's gradient of hot rows: its k-th Fisher
    among zeros at the higher densities) and small ones, with weight decay moving every
    param's |p| between steps."""
    from incrkern import ops
    from incrkern.optim import base
    start, grads = hot_rows_steps(dtype)
    opts, calls = [], []
    for name in ("adam_select_update_", "select", "select_mask"):  # the routes' ops
        monkeypatch.setattr(ops, name, lambda *a, _name=name, _real=getattr(ops, name), **k:
                            calls.append(_name) or _real(*a, **k))
    for fused in (True, False):
        calls.clear()
        monkeypatch.setattr(base, base._KEYED_DENSITY[select], 0.0 if fused else 2.0)
        params = [nn.Parameter(p.clone()) for p in start]
        opt = incrkern.optim.AdamW(params, lr=0.01, density=density, select=select,
                                   weight_decay=0.1, fisher_beta=0.9)
        step_seeded(opt, params, grads)
        opts.append((params, opt))
        # The fused route's first step, with no state yet, is the Python step's; the
        # later ones are the one C++ call's (fast_step), which calls the kernel itself.
        assert calls == (["adam_select_update_"] if fused else
                         ["select_mask" if density >= base.MASK_DENSITY else "select"] * 3)
    assert_same_steps(opts, start)
