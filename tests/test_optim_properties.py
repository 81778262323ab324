"""Property tests (hypothesis) of incrkern.optim over random shapes, dtypes, densities,
selection criteria, scopes, masks and step sequences:
  - it equals tests/reference_optim.py's ReferenceOptimizer;
  - no unchosen element of a param or of its optimizer state ever changes;
  - a saved and reloaded optimizer continues bit-identically;
  - results do not depend on the number of CPU threads.
The CI run is bounded (profile "ci" in conftest.py);
INCRKERN_HYPOTHESIS_PROFILE=long runs many more examples."""
import copy

import torch
from hypothesis import given, strategies as st

import incrkern
from reference_optim import ReferenceOptimizer
from test_optim_incremental import KINDS

SHAPES = [(0,), (1,), (7,), (33,), (5, 9), (300,), (17, 31)]
# test_optim_incremental's hyperparameters, with nesterov and maximize drawn in too
HYPER = {"SGD": ("sgd", dict(KINDS["SGD"][1], nesterov=True)),
         "Adam": ("adam", dict(KINDS["Adam"][1], maximize=True)),
         "AdamW": ("adam", dict(KINDS["AdamW"][1], beta1=0.8, beta2=0.99))}
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer", "age")


def torch_kwargs(name):
    kind, h = HYPER[name]
    if kind == "sgd":
        return {k: h[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov",
                                  "maximize")}
    return dict(lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                weight_decay=h["weight_decay"], maximize=h["maximize"])


@st.composite
def configs(draw, selects=("grad", "grad_sq", "weight", "accumulated", "random"),
            dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)):
    name = draw(st.sampled_from(sorted(HYPER)))
    select = draw(st.sampled_from(selects))
    masks = ["dynamic", 1, 2] + ([] if select == "accumulated" else ["fixed"])
    options = dict(density=draw(st.sampled_from([0.01, 0.05, 0.1, 0.3, 0.5, 1.0])
                                | st.floats(0.001, 1.0)),
                   select=select,
                   scope=draw(st.sampled_from(["tensor", "global"])),
                   mask=draw(st.sampled_from(masks)),
                   accumulate_steps=draw(st.sampled_from([1, 1, 2, 3])))
    if HYPER[name][0] == "adam" and draw(st.booleans()):
        options["bias_correction"] = "element"
    return dict(name=name, options=options,
                shapes=draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4)),
                dtype=draw(st.sampled_from(dtypes)),
                steps=draw(st.integers(1, 7)),
                # "ties": small integers, many equal scores (ties go to the lowest index)
                grads=draw(st.sampled_from(["normal", "normal", "ties"])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def make_params(config):
    g = torch.Generator().manual_seed(config["seed"])
    return [torch.randn(s, generator=g).to(config["dtype"]).requires_grad_()
            for s in config["shapes"]]


def grads_for(config, params, steps):
    g = torch.Generator().manual_seed(config["seed"] + 1)
    out = []
    for _ in range(steps):
        if config["grads"] == "ties":
            out.append([torch.randint(-2, 3, p.shape, generator=g).to(p.dtype) for p in params])
        else:
            out.append([torch.randn(p.shape, generator=g).to(p.dtype) for p in params])
    return out


def make_optimizer(config, params):
    return getattr(incrkern.optim, config["name"])(params, **torch_kwargs(config["name"]),
                                                  **config["options"])


def run(opt, params, grads_per_step, seed=7):
    torch.manual_seed(seed)  # select="random" draws from torch's global generator
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


@given(configs(selects=("grad", "grad_sq", "weight", "accumulated"), dtypes=(torch.float32,)))
def test_equals_reference_optimizer(config):
    params = make_params(config)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt = make_optimizer(config, params)
    kind, hyper = HYPER[config["name"]]
    ref = ReferenceOptimizer(ref_params, kind, hyper, **config["options"])
    for grads in grads_for(config, params, config["steps"]):
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, s in zip(params, ref.state):
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer", "residual"):
            if key in s:
                torch.testing.assert_close(opt.state[p][key].reshape(-1).float(), s[key],
                                           rtol=1e-5, atol=1e-6, msg=key)


@given(configs())
def test_unchosen_elements_never_change(config):
    """With a kept mask (mask=N or 'fixed') the chosen positions are in the state:
    outside them neither the param nor its (param-sized) moments move, ever."""
    if config["options"]["mask"] == "dynamic":
        config["options"]["mask"] = 1  # reselects every update, keeps the indices
    params = make_params(config)
    opt = make_optimizer(config, params)
    torch.manual_seed(7)
    for grads in grads_for(config, params, config["steps"]):
        before = [p.detach().clone() for p in params]
        state_before = copy.deepcopy([dict(opt.state[p]) for p in params])
        updating = not opt.accumulating
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, b, sb in zip(params, before, state_before):
            state = opt.state[p]
            if not updating:
                assert torch.equal(p, b)
                for key in MOMENT_KEYS:
                    if key in sb:
                        assert torch.equal(state[key], sb[key]), key
                continue
            unchosen = torch.ones(p.numel(), dtype=torch.bool)
            if "indices" in state:
                unchosen[state["indices"].long()] = False
            else:  # a dense update (density 1) keeps no indices
                assert config["options"]["density"] >= 1.0
                unchosen[:] = False
            flat, flat_before = p.detach().reshape(-1), b.reshape(-1)
            assert torch.equal(flat[unchosen], flat_before[unchosen])
            compact = config["options"]["mask"] == "fixed"
            for key in MOMENT_KEYS:
                if key in sb and not compact:
                    now, was = state[key].reshape(-1), sb[key].reshape(-1)
                    assert torch.equal(now[unchosen], was[unchosen]), key


@given(configs(), st.integers(0, 6))
def test_reload_continues_bit_identically(config, split):
    params = make_params(config)
    opt = make_optimizer(config, params)
    grads = grads_for(config, params, config["steps"] + split)
    run(opt, params, grads[:split])
    saved = copy.deepcopy(opt.state_dict())
    twins = [p.detach().clone().requires_grad_() for p in params]
    twin_opt = make_optimizer(config, twins)
    twin_opt.load_state_dict(saved)
    run(opt, params, grads[split:], seed=11)
    run(twin_opt, twins, grads[split:], seed=11)
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
    for p, q in zip(params, twins):
        for key, value in opt.state[p].items():
            assert torch.equal(value, twin_opt.state[q][key]), key


@given(configs())
def test_thread_count_does_not_change_results(config):
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            params = make_params(config)
            opt = make_optimizer(config, params)
            run(opt, params, grads_for(config, params, config["steps"]))
            results.append((params, opt))
    finally:
        torch.set_num_threads(threads)
    (p1, o1), (p2, o2) = results
    for p, q in zip(p1, p2):
        assert torch.equal(p, q)
        for key, value in o1.state[p].items():
            assert torch.equal(value, o2.state[q][key]), key
