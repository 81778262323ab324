"""Which steps run on the GPU without the host: under CUDA graph capture, and when
torch.amp.GradScaler's inf flag is left to the kernels. Both ask whether a step's
work is decided on the device alone."""


def _fixed_mask_unmade(opt, group, params):
    """mask='fixed' whose mask some param has yet to make (at its first step, on the
    host)."""
    return group["mask"] == "fixed" and not all("indices" in opt.state.get(p, ())
                                                for p in params)


def check_capturable(opt, plans, sparse_plans):
    """Under CUDA graph capture, only a sparse step whose work is the same at every
    replay may run: per-tensor exact selection (k fixed per tensor, nothing read
    back on the host), reselected at every update or by a mask made before the
    capture. The rest would be recorded with one step's host-side decisions and
    replay them: refused with the reason, before any group is touched."""
    reasons = []
    if any(pairs for _, pairs in sparse_plans):
        reasons.append("sparse gradients have their rows counted on the host")
    for group, params, _, _ in plans:
        if not params or opt._is_dense(group):
            continue
        if group["scope"] != "tensor":
            reasons.append("scope='global' reads the selection's output size on the host")
        if group["topk"] != "exact":
            reasons.append("topk='approx' reads its count on the host")
        if group["select"] in ("random", "layer"):
            reasons.append(f"select={group['select']!r} draws its choice on the host")
        if group["mask"] not in ("dynamic", "fixed"):
            reasons.append("mask=N counts updates on the host")
        elif _fixed_mask_unmade(opt, group, params):
            reasons.append("mask='fixed' makes its mask at the first step: take that "
                           "step before capturing")
        if group["accumulate_steps"] != 1:
            reasons.append("accumulate_steps counts calls on the host")
    if reasons:
        raise RuntimeError("incrkern: this step cannot be captured in a CUDA graph: "
                           + "; ".join(dict.fromkeys(reasons)) + ". Step it eagerly, or "
                           "use scope='tensor', topk='exact' and select='grad', "
                           "'grad_sq', 'weight' or 'accumulated'.")


def skips_on_device(opt, plans, sparse_plans, found_inf):
    """Whether a step with GradScaler's inf flag on a GPU can leave the skip to its
    kernels (no host sync): every group dense, or sparse with per-step work that
    the kernels skip whole. Host-side counters and buffers (accumulate_steps,
    mask=N, layer draws, a param's first step, which makes its state, momentum
    correction's velocity, sparse gradients' scratch) would move on a skipped step:
    those read the flag on the host instead. `updates` counts step() calls either
    way."""
    if found_inf.device.type == "cpu" or any(pairs for _, pairs in sparse_plans):
        return False
    state = opt.state
    for group, params, _, _ in plans:
        if not all(state.get(p) for p in params):
            return False
        if not params or opt._is_dense(group):
            continue
        if (group["accumulate_steps"] != 1 or group["select"] == "layer"
                or group.get("momentum_correction")
                or group["mask"] not in ("dynamic", "fixed")
                or _fixed_mask_unmade(opt, group, params)):
            return False
    return True
