"""The one-call C++ step (incrkern/optim/fast_step.py) against the Python step it
replaces: bit-identical params, state and counters wherever it runs, and a step that
falls back, untouched, wherever it does not."""
import copy
import sys

import pytest
import torch

import incrkern
from incrkern.optim import base, fast_step

from helpers import recorded

pytestmark = pytest.mark.skipif(fast_step._fused_adam_step is None,
                                reason="the extension is not built")

# Sizes around the kernel's paths: empty, one element, odd, a vector-width remainder,
# a density * numel just above an integer (0.01 * 700), the small-tensor limit.
SIZES = (0, 1, 7, 33, 700, 4099, 20000, base.FUSED_SMALL_NUMEL)


@pytest.fixture
def spy(monkeypatch):
    """The update call's answers: per taken step, a list per group."""
    return recorded(monkeypatch, "_fused_adam_step")


def assert_same(fast, slow, fast_params, slow_params):
    """Params, state and group options bit-identical."""
    for p, q in zip(fast_params, slow_params):
        assert torch.equal(p, q)
    fast_state, slow_state = fast.state_dict(), slow.state_dict()
    assert fast_state["param_groups"] == slow_state["param_groups"]
    for i, s in slow_state["state"].items():
        assert fast_state["state"][i].keys() == s.keys()
        for key, t in s.items():
            assert torch.equal(fast_state["state"][i][key], t), (i, key)


def make_params(sizes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in sizes]


def heavy_tailed_grads(params, step):
    """Student-t grads with exact zeros, ties and a row of zeros: real gradients' shape."""
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        g = torch.distributions.StudentT(2.0).sample((p.numel(),))
        g[torch.rand(p.numel(), generator=gen) < 0.3] = 0.0
        if p.numel() > 8:
            g[: p.numel() // 4] = g[0]  # a run of ties
        if i == 1:
            g.zero_()
        p.grad = g.to(p.dtype)


def run(opt_cls, params, groups_of, steps, enabled, monkeypatch, **options):
    monkeypatch.setattr(fast_step, "ENABLED", enabled)
    torch.manual_seed(0)
    opt = opt_cls(groups_of(params), **options)
    for step in range(steps):
        heavy_tailed_grads(params, step)
        opt.step()
    return opt


def one_group(params):
    return params


def two_groups(params):
    return [dict(params=params[::2]), dict(params=params[1::2], lr=3e-3, weight_decay=0.0)]


@pytest.mark.parametrize("opt_cls", [incrkern.optim.Adam, incrkern.optim.AdamW])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("select", ["grad", "accumulated", "weight", "grad_sq", "random"])
@pytest.mark.parametrize("topk", ["exact", "approx"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.3])
@pytest.mark.parametrize("groups_of", [one_group, two_groups])
def test_same_as_the_python_step(opt_cls, dtype, select, topk, density, groups_of, spy,
                                 monkeypatch):
    options = dict(lr=1e-2, density=density, select=select, topk=topk, maximize=True,
                   weight_decay=0.05)
    fast_params, slow_params = make_params(SIZES, dtype), make_params(SIZES, dtype)
    fast = run(opt_cls, fast_params, groups_of, 4, True, monkeypatch, **options)
    taken = [a for a in spy if a is not None]
    # The first step makes the state in Python; every later one is the C++ call.
    assert spy[0] is None and len(taken) == 3
    slow = run(opt_cls, slow_params, groups_of, 4, False, monkeypatch, **options)
    assert len(spy) == 4  # the disabled run never called it
    assert_same(fast, slow, fast_params, slow_params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("select", ["grad", "accumulated", "weight", "grad_sq", "random"])
@pytest.mark.parametrize("topk", ["exact", "approx"])
def test_through_the_op_kernel_same_as_the_python_step(dtype, select, topk, spy,
                                                       monkeypatch):
    """The route a GPU's groups take (the op's kernel called from C++, the versions
    bumped after), taken by the CPU's: the same params, state and counters as the
    Python step, and every written tensor's version bumped once."""
    monkeypatch.setattr(fast_step, "THROUGH_OP", True)
    options = dict(lr=1e-2, density=0.01, select=select, topk=topk, weight_decay=0.05)
    fast_params, slow_params = make_params(SIZES, dtype), make_params(SIZES, dtype)
    fast = run(incrkern.optim.AdamW, fast_params, two_groups, 4, True, monkeypatch, **options)
    assert spy[0] is None and all(a is not None for a in spy[1:]) and len(spy) == 4
    slow = run(incrkern.optim.AdamW, slow_params, two_groups, 4, False, monkeypatch,
               **options)
    assert_same(fast, slow, fast_params, slow_params)

    heavy_tailed_grads(fast_params, 4)
    written = fast_params + [fast.state[p][key] for p in fast_params
                             for key in ("exp_avg", "exp_avg_sq", "step")]
    before = [t._version for t in written]
    monkeypatch.setattr(fast_step, "ENABLED", True)
    fast.step()
    assert spy[-1] is not None
    assert [t._version for t in written] == [v + 1 for v in before]


def test_a_cycle_end_through_the_op_kernel_same_as_the_python_step(spy, monkeypatch):
    """With accumulate_steps that route zeroes the spent accumulators too."""
    monkeypatch.setattr(fast_step, "THROUGH_OP", True)
    sizes = (700, 33, 1, 4099)
    options = dict(lr=1e-2, density=0.01, accumulate_steps=2)
    fast_params, slow_params = make_params(sizes, torch.float32), make_params(sizes, torch.float32)
    fast = run(incrkern.optim.AdamW, fast_params, one_group, 6, True, monkeypatch, **options)
    assert len(spy) == 3 and spy[0] is None and all(a == [[]] for a in spy[1:])
    slow = run(incrkern.optim.AdamW, slow_params, one_group, 6, False, monkeypatch, **options)
    assert_same(fast, slow, fast_params, slow_params)
    for p in fast_params:
        assert not fast.state[p]["grad_acc"].any()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("select", ["grad", "accumulated"])
@pytest.mark.parametrize("accumulate_steps", [1, 2])
def test_on_a_gpu_same_as_the_python_step(dtype, select, accumulate_steps, spy, monkeypatch):
    """With CUDA_ENABLED a GPU's step is the one call: the same params, state and
    counters as the Python step on the same GPU."""
    if select == "accumulated" and accumulate_steps > 1:
        pytest.skip("error feedback accumulates no grad_acc")
    monkeypatch.setattr(fast_step, "CUDA_ENABLED", True)
    options = dict(lr=1e-2, density=0.01, select=select, weight_decay=0.05,
                   accumulate_steps=accumulate_steps)
    made = [make_params(SIZES, dtype) for _ in range(2)]
    fast_params, slow_params = ([torch.nn.Parameter(p.detach().cuda()) for p in ps]
                                for ps in made)

    def run_cuda(params, enabled):
        monkeypatch.setattr(fast_step, "ENABLED", enabled)
        torch.manual_seed(0)
        opt = incrkern.optim.AdamW(two_groups(params), **options)
        for step in range(4 * accumulate_steps):
            cpu = make_params(SIZES, dtype)
            heavy_tailed_grads(cpu, step)
            for p, c in zip(params, cpu):
                p.grad = c.grad.cuda()
            opt.step()
        return opt

    fast = run_cuda(fast_params, True)
    assert sum(a is not None for a in spy) == 3
    slow = run_cuda(slow_params, False)
    assert_same(fast, slow, fast_params, slow_params)


def test_a_group_without_grads_is_not_counted(spy, monkeypatch):
    params = make_params([50, 60, 70], torch.float32)
    opt = incrkern.optim.AdamW([dict(params=params[:2]), dict(params=params[2:])],
                               density=0.1)
    heavy_tailed_grads(params, 0)
    opt.step()
    params[2].grad = None
    opt.step()
    assert spy[-1] == [[], None]
    assert [g["updates"] for g in opt.param_groups] == [2, 1]
    assert opt.state[params[2]]["step"].item() == 1.0


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_untouched(opt, params, before):
    values, state = before
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    now = opt.state_dict()
    for i, s in state["state"].items():
        for key, t in s.items():
            assert torch.equal(now["state"][i][key], t), (i, key)


def stepped_once(sizes=(40, 50, 60), **options):
    params = make_params(sizes, torch.float32)
    opt = incrkern.optim.AdamW(params, density=0.1, **options)
    heavy_tailed_grads(params, 0)
    opt.step()
    heavy_tailed_grads(params, 1)
    return opt, params


def other_dtype_grad(p):
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None  # let autograd's own guard through, to test ours
    p.grad = p.grad.double()


@pytest.mark.parametrize("spoil, error", [
    (lambda opt, ps: other_dtype_grad(ps[1]), "dtype"),
    (lambda opt, ps: opt.state[ps[2]].__setitem__("exp_avg_sq", torch.zeros(59)),
     "exp_avg_sqs"),
    (lambda opt, ps: opt.state[ps[0]].__setitem__("step", opt.state[ps[1]]["step"]),
     "share one state"),
    (lambda opt, ps: opt.state[ps[2]].__setitem__("exp_avg", torch.zeros(60).double()),
     "exp_avgs"),
])
def test_a_bad_step_falls_back_and_touches_nothing(spoil, error, spy):
    opt, params = stepped_once()
    spoil(opt, params)
    before = snapshot(opt, params)
    with pytest.raises((RuntimeError, TypeError, ValueError), match=error):
        opt.step()
    assert spy[-1] is None
    assert_untouched(opt, params, before)


def test_a_bad_param_among_many_falls_back_and_touches_nothing(spy):
    """Among more params than one thread checks (the checks and the version bumps run
    over the threads in runs of params), a bad one near the end still stops the call
    before anything is touched."""
    opt, params = stepped_once(sizes=(24,) * 1300)
    opt.state[params[1290]]["exp_avg_sq"] = torch.zeros(23)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="exp_avg_sqs"):
        opt.step()
    assert spy[-1] is None
    assert_untouched(opt, params, before)


@pytest.mark.parametrize("change, taken", [
    (lambda opt, ps: setattr(ps[0], "grad", torch.arange(160.0).sin().view(80, 2)[:, 0]),
     False),
    (lambda opt, ps: setattr(ps[1], "grad", ps[1].grad.to_sparse()), False),
    (lambda opt, ps: opt.param_groups[0].__setitem__("accumulate_steps", 2), False),
    (lambda opt, ps: opt.param_groups[0].__setitem__("scope", "global"), True),
    (lambda opt, ps: opt.param_groups[0].update(scope="global", topk="approx"), True),
    (lambda opt, ps: opt.param_groups[0].__setitem__("density", 1.0), False),
    (lambda opt, ps: setattr(opt, "grad_scale", torch.tensor(1.0)), False),
    (lambda opt, ps: setattr(ps[2], "grad", None), True),
    (lambda opt, ps: opt.param_groups[0].__setitem__("lr", torch.tensor(1e-3)), True),
])
def test_other_steps_as_the_python_step(change, taken, spy, monkeypatch):
    opt, params = stepped_once(sizes=(80, 50, 60))
    assert_changed_step_as_python(opt, params, change, taken, spy, monkeypatch)


def assert_changed_step_as_python(opt, params, change, taken, answers, monkeypatch):
    """The step after `change`, on opt and on a copy by the Python step: the C++ call
    taken or not as said, and the same params and state."""
    slow_opt = copy.deepcopy(opt)
    slow_params = [p for group in slow_opt.param_groups for p in group["params"]]
    for p, q in zip(params, slow_params):
        q.grad = p.grad.clone()
    change(opt, params)
    change(slow_opt, slow_params)
    opt.step()
    assert (answers[-1] is not None) == taken
    monkeypatch.setattr(fast_step, "ENABLED", False)
    slow_opt.step()
    for p, q in zip(params, slow_params):
        assert torch.equal(p, q)
    for s, t in zip(opt.state.values(), slow_opt.state.values()):
        assert s.keys() == t.keys()
        for key in t:
            assert torch.equal(s[key], t[key]), key


def test_the_cost_model_sends_large_tensors_elsewhere(spy, monkeypatch):
    """Beyond FUSED_SMALL_NUMEL and below FUSED_MIN_DENSITY a tensor takes select
    then update: the call steps the others and hands it back to the Python step."""
    sizes = [base.FUSED_SMALL_NUMEL + 1, 10, base.FUSED_SMALL_NUMEL]
    density = base.FUSED_MIN_DENSITY / 2
    fast_params, slow_params = make_params(sizes, torch.float32), make_params(sizes, torch.float32)
    fast = run(incrkern.optim.AdamW, fast_params, two_groups, 3, True, monkeypatch,
               density=density)
    assert spy[0] is None and len(spy) == 3
    for answer in spy[1:]:  # two groups: [large, at the limit] and [10 elements]
        assert len(answer) == 2 and answer[1] == []
        assert len(answer[0]) == 1 and answer[0][0] is fast_params[0]
    slow = run(incrkern.optim.AdamW, slow_params, two_groups, 3, False, monkeypatch,
               density=density)
    assert_same(fast, slow, fast_params, slow_params)


@pytest.mark.parametrize("param_hash", [
    pytest.param(None, id="id"),
    pytest.param(lambda self: id(self) ^ 0x5a5a0, id="not-the-address"),
])
def test_the_state_is_found_whatever_a_param_hashes_to(param_hash, spy, monkeypatch):
    """The call looks a param's state up with the param's address as its hash when
    Tensor.__hash__ gives that (id), and by the param's own hash otherwise."""
    if param_hash is not None:
        monkeypatch.setattr(torch.nn.Parameter, "__hash__", param_hash)
    sizes = (40, 700, 20000)
    fast_params, slow_params = make_params(sizes, torch.float32), make_params(sizes, torch.float32)
    fast = run(incrkern.optim.AdamW, fast_params, two_groups, 3, True, monkeypatch,
               density=0.01)
    assert spy[0] is None and all(answer is not None for answer in spy[1:])
    slow = run(incrkern.optim.AdamW, slow_params, two_groups, 3, False, monkeypatch,
               density=0.01)
    assert_same(fast, slow, fast_params, slow_params)


def test_a_subclass_param_takes_the_python_path(spy):
    class Tagged(torch.nn.Parameter):
        pass

    params = [Tagged(torch.randn(30)), torch.nn.Parameter(torch.randn(30))]
    opt = incrkern.optim.AdamW(params, density=0.1)
    for step in range(2):
        heavy_tailed_grads(params, step)
        opt.step()
    assert spy == [None, None]


def test_a_subclass_grad_takes_the_python_path(spy):
    class Tagged(torch.Tensor):
        pass

    params = make_params((30, 40), torch.float32)
    opt = incrkern.optim.AdamW(params, density=0.1)
    for step in range(2):
        heavy_tailed_grads(params, step)
        params[1].grad = params[1].grad.as_subclass(Tagged)
        opt.step()
    assert spy == [None, None]


def backward_grads(model, step):
    """Grads as autograd leaves them: tensors with no Python object until read."""
    model.zero_grad(set_to_none=True)
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(step))
    model(x).square().mean().backward()


@pytest.mark.parametrize("select", ["grad", "accumulated"])
def test_grads_from_backward_same_as_the_python_step(select, spy, monkeypatch):
    """The call reads each grad from the param's tensor, not from the `grad` attribute;
    a grad that autograd made and Python never read has no object of its own."""
    def model():
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Linear(12, 30), torch.nn.Tanh(),
                                   torch.nn.Linear(30, 5))

    answers = []
    for enabled in (True, False):
        monkeypatch.setattr(fast_step, "ENABLED", enabled)
        net = model()
        opt = incrkern.optim.AdamW(net.parameters(), lr=1e-2, density=0.05, select=select)
        for step in range(4):
            backward_grads(net, step)
            opt.step()
        answers.append((net, opt))
    assert spy[0] is None and len(spy) == 4 and all(a is not None for a in spy[1:])
    (fast_net, fast), (slow_net, slow) = answers
    assert_same(fast, slow, list(fast_net.parameters()), list(slow_net.parameters()))


def test_the_step_holds_what_it_borrows(spy):
    """The call borrows the params' and state's tensors from their Python objects,
    holding a reference to each object while it runs, and gives every reference back."""
    opt, params = stepped_once()
    state = opt.state[params[0]]
    held = [params[0], state["exp_avg"], state["exp_avg_sq"], state["step"]]
    counts = [sys.getrefcount(t) for t in held]
    opt.step()
    assert spy[-1] == [[]]
    assert [sys.getrefcount(t) for t in held] == counts


# Micro-steps of accumulate_steps: the grads added to grad_acc (or the residual) in
# one call, the update by the Python step.


@pytest.fixture
def micro_spy(monkeypatch):
    """The micro-step call's answers: per taken step, a bool per group."""
    return recorded(monkeypatch, "_accumulate_grads")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("select", ["grad", "accumulated"])
@pytest.mark.parametrize("groups_of", [one_group, two_groups])
def test_micro_steps_same_as_the_python_step(dtype, select, groups_of, micro_spy, monkeypatch):
    options = dict(lr=1e-2, density=0.01, select=select, accumulate_steps=3,
                   weight_decay=0.05)
    fast_params, slow_params = make_params(SIZES, dtype), make_params(SIZES, dtype)
    fast = run(incrkern.optim.AdamW, fast_params, groups_of, 7, True, monkeypatch, **options)
    # Micro-steps 1, 2, 4, 5 and 7; the first makes the buffers in Python.
    assert len(micro_spy) == 5 and micro_spy[0] is None
    assert all(answer is not None and all(answer) for answer in micro_spy[1:])
    slow = run(incrkern.optim.AdamW, slow_params, groups_of, 7, False, monkeypatch, **options)
    assert_same(fast, slow, fast_params, slow_params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups_of", [one_group, two_groups])
def test_cycle_ends_same_as_the_python_step(dtype, groups_of, spy, monkeypatch):
    """The update that ends a cycle of accumulate_steps is the one call too: the
    accumulated grads are the kernel's residuals, read times 1 / n, then zeroed. A
    tensor the cost model sends elsewhere is handed back, and the Python step adds its
    grad and updates it."""
    sizes = (base.FUSED_SMALL_NUMEL + 1, 700, 33, 1)
    options = dict(lr=1e-2, density=base.FUSED_MIN_DENSITY / 2, accumulate_steps=2,
                   weight_decay=0.05)
    fast_params, slow_params = make_params(sizes, dtype), make_params(sizes, dtype)
    fast = run(incrkern.optim.AdamW, fast_params, groups_of, 8, True, monkeypatch, **options)
    # Updates at steps 2, 4, 6 and 8: the first makes the state in Python.
    assert len(spy) == 4 and spy[0] is None
    for answer in spy[1:]:
        handed_back = [p for left in answer if left for p in left]
        assert handed_back == [fast_params[0]]
    slow = run(incrkern.optim.AdamW, slow_params, groups_of, 8, False, monkeypatch, **options)
    assert_same(fast, slow, fast_params, slow_params)
    assert all(g["accumulated_calls"] == 0 and g["updates"] == 4 for g in fast.param_groups)
    for p in fast_params:
        assert not fast.state[p]["grad_acc"].any()  # spent, chosen or not


def accumulating(steps):
    """An AdamW at accumulate_steps=2 taken through `steps` steps (an update at every
    second), the grads of the next step set."""
    params = make_params((40, 50, 60), torch.float32)
    opt = incrkern.optim.AdamW(params, density=0.1, accumulate_steps=2)
    for step in range(steps):
        heavy_tailed_grads(params, step)
        opt.step()
    heavy_tailed_grads(params, steps)
    return opt, params


def assert_bad_step_touches_nothing(opt, params, spoil, error, answers):
    """After spoil, the step raises the Python step's error, the C++ call having
    answered None, and nothing has changed."""
    spoil(opt, params)
    before = snapshot(opt, params)
    with pytest.raises((RuntimeError, TypeError, ValueError), match=error):
        opt.step()
    assert answers[-1] is None
    assert_untouched(opt, params, before)


@pytest.mark.parametrize("spoil, error", [
    (lambda opt, ps: other_dtype_grad(ps[1]), "dtype"),
    (lambda opt, ps: opt.state[ps[2]].__setitem__("grad_acc", torch.zeros(59)), "residuals"),
    (lambda opt, ps: opt.state[ps[0]].__setitem__("step", opt.state[ps[1]]["step"]),
     "share one state"),
])
def test_a_bad_cycle_end_falls_back_and_touches_nothing(spoil, error, spy):
    opt, params = accumulating(3)  # a whole cycle (the state made), then a micro-step
    assert_bad_step_touches_nothing(opt, params, spoil, error, spy)


@pytest.mark.parametrize("spoil, error", [
    (lambda opt, ps: other_dtype_grad(ps[1]), "dtype"),
    (lambda opt, ps: opt.state[ps[0]].__setitem__("step", opt.state[ps[1]]["step"]),
     "share one state"),
    (lambda opt, ps: opt.state[ps[2]].__setitem__("grad_acc", torch.zeros(59)), "accs"),
])
def test_a_bad_micro_step_falls_back_and_touches_nothing(spoil, error, micro_spy):
    opt, params = accumulating(4)  # two cycles, the buffers made
    assert micro_spy[-1] == [True]  # the second cycle's micro-step was the call
    assert_bad_step_touches_nothing(opt, params, spoil, error, micro_spy)
    assert opt.param_groups[0]["accumulated_calls"] == 0
