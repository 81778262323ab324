"""incrkern.optim.AdamW's step over densities up to 1, on the sparse benchmark's cases
(real gradients and random ones, sized from the last-level cache as `make bench`
sizes them), against torch.optim.AdamW(fused=True) on the same params and grads,
the two taking turns in one process. A cost model that sends some tensors down a
slow path at some density shows here as a ratio well under 1.

    python bench/density_sweep.py [--densities 0.1,0.5,0.9,0.99] [--select grad]
        [--topk exact] [--cases minilm,char,many,list] [--threads N] [--numel N]
        [--composed] [--optimizer sgd]

--optimizer sgd: incrkern.optim.SGD with momentum 0.9 against torch.optim.SGD(momentum=0.9,
fused=True) instead.

--composed (a select whose CPU step the fused call took over: "weight", "grad_sq",
"random", or SGD) also times the step the way it went before, select then update (its
density constant in incrkern.optim.base set to 2 during those steps), the three taking
turns.
"""
import argparse

import torch

import incrkern
from incrkern.bench import common, sparse
from incrkern.optim import base

CASES = {"minilm": "pretrained MiniLM-L6", "char": "char transformer from scratch",
         "one": "random one tensor", "many": "random many tensors",
         "list": "random transformer list"}


# The dense torch step and incrkern's, each given params (and incrkern's options).
OPTIMIZERS = {
    "adamw": (lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True),
              lambda params, **options: incrkern.optim.AdamW(params, lr=1e-3, **options)),
    "sgd": (lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True),
            lambda params, **options: incrkern.optim.SGD(params, lr=1e-3, momentum=0.9,
                                                         **options)),
}


def step_of(opt, constant=None, value=None):
    """opt.step(), with base's `constant` set to `value` during it when given."""
    def step():
        saved = getattr(base, constant) if constant else None
        if constant:
            setattr(base, constant, value)
        try:
            with torch.no_grad():
                opt.step()
        finally:
            if constant:
                setattr(base, constant, saved)
    return step


def params_with_grads(case):
    params = [w.clone().requires_grad_() for w in case.weights]
    for p, g in zip(params, case.grads):
        p.grad = g.clone()
    return params


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--densities", default="0.1,0.5,0.75,0.9,0.99")
    parser.add_argument("--select", default="grad")
    parser.add_argument("--topk", default="exact")
    parser.add_argument("--cases", default="minilm,char,many,list")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--numel", type=float, default=None,
                        help="each case's elements (default: from the last-level cache)")
    parser.add_argument("--composed", action="store_true",
                        help="also time the select-then-update step the fused call replaced")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    args = parser.parse_args()
    fused_constants = dict(base._KEYED_DENSITY, sgd="FUSED_SGD_DENSITY")
    kind = "sgd" if args.optimizer == "sgd" else args.select
    constant = fused_constants.get(kind) if args.composed else None
    if args.composed and constant is None:
        parser.error(f"--composed needs --optimizer sgd or a select among "
                     f"{', '.join(base._KEYED_DENSITY)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sparse.SPARSE_SIZES["quick"]
    target = int(args.numel or sparse.working_set_numel(sparse.llc_bytes(torch.device("cpu"))[0]))
    wanted = {CASES[name] for name in args.cases.split(",")}
    print(f"{common.cpu_model()}, {torch.get_num_threads()} threads; {args.optimizer}, "
          f"select={args.select}, topk={args.topk}; "
          f"medians of steps taking turns with torch's, ms")
    for name, build in sparse.build_cases(sizes, target):
        if name not in wanted:
            continue
        case = build()
        if case.reason:
            print(f"{name}: {case.reason}")
            continue
        dense = OPTIMIZERS[args.optimizer][0](params_with_grads(case))
        ours_of = OPTIMIZERS[args.optimizer][1]
        for density in map(float, args.densities.split(",")):
            opt = ours_of(params_with_grads(case), density=density, select=args.select,
                          topk=args.topk)
            if constant:
                old = ours_of(params_with_grads(case), density=density, select=args.select,
                              topk=args.topk)
                ours, composed, torchs = common.measure_turns(
                    [step_of(opt), step_of(old, constant, 2.0), step_of(dense)], warmup=2,
                    repeats=9)
                print(f"{name}, density {density:g}: {1e3 * ours['median_s']:.2f}, composed "
                      f"{1e3 * composed['median_s']:.2f}, torch {1e3 * torchs['median_s']:.2f}: "
                      f"{composed['median_s'] / ours['median_s']:.2f}x the composed step, "
                      f"{torchs['median_s'] / ours['median_s']:.2f}x torch's (composed "
                      f"{torchs['median_s'] / composed['median_s']:.2f}x)", flush=True)
                del opt, old
                continue
            ours, torchs = common.measure_pair(step_of(opt), step_of(dense), warmup=2,
                                               repeats=9, min_time_s=1.0, max_time_s=3.0)
            print(f"{name}, density {density:g}: {1e3 * ours['median_s']:.2f} against "
                  f"{1e3 * torchs['median_s']:.2f}, {torchs['median_s'] / ours['median_s']:.2f}x",
                  flush=True)
            del opt


if __name__ == "__main__":
    main()
