"""The argument checks the typed op wrappers (incrkern.ops) share: each raises a clear
ValueError / TypeError naming the argument before any tensor is touched."""
import torch

from .reference import math_dtype

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CUDA_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def as_list(name, value, allow_none=False):
    if value is None and allow_none:
        return []
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return list(value)


def check_length(name, values, n, may_be_empty=False):
    if len(values) != n and not (may_be_empty and not values):
        raise ValueError(f"{name} has {len(values)} tensors, expected {n}"
                         + (" (or none)" if may_be_empty else ""))


def check_number(name, value, low=None, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def check_tensor(name, t, *, device, dtypes=None, numel=None, dim=None):
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}, expected one of "
                        + ", ".join(str(d) for d in dtypes))
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, expected {numel}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (an in-place argument is never copied)")


def check_update(params, grads, first_moments, second_moments, steps, indices, masks, ages,
                  compact_state, first_moments_name, max_second_moments=()):
    """Checks the tensor lists of an update op against each other. `first_moments`:
    Adam's exp_avgs or SGD's momentum_buffers (named `first_moments_name` in errors);
    `second_moments`: Adam's exp_avg_sqs, None for SGD; `max_second_moments`:
    AMSGrad's max_exp_avg_sqs, empty without AMSGrad."""
    n = len(params)
    check_length("grads", grads, n)
    check_length(first_moments_name, first_moments, n, may_be_empty=second_moments is None)
    if second_moments is not None:
        check_length("exp_avg_sqs", second_moments, n)
        check_length("steps", steps, n)
    check_length("indices", indices, n, may_be_empty=True)
    check_length("masks", masks, n, may_be_empty=True)
    check_length("ages", ages, n, may_be_empty=True)
    check_length("max_exp_avg_sqs", max_second_moments, n, may_be_empty=True)
    if indices and masks:
        raise ValueError("give indices or masks, not both")
    if compact_state and not indices:
        raise ValueError("compact_state=True needs indices")
    for i, p in enumerate(params):
        device = p.device
        if device != params[0].device:
            raise ValueError(f"params[{i}] is on {device}, params[0] on {params[0].device}: "
                             "one call takes one device")
        dtypes = CUDA_FLOAT_DTYPES if device.type == "cuda" else FLOAT_DTYPES
        check_tensor(f"params[{i}]", p, device=device, dtypes=dtypes)
        math = math_dtype(p.dtype)
        check_tensor(f"grads[{i}]", grads[i], device=device,
                      dtypes=tuple({p.dtype, math}), numel=p.numel())
        if indices:
            check_tensor(f"indices[{i}]", indices[i], device=device, dtypes=(torch.int64,),
                          dim=1)
            if indices[i].numel():
                low, high = (int(v) for v in torch.aminmax(indices[i]))
                if low < 0 or high >= p.numel():
                    raise ValueError(f"indices[{i}] holds positions outside [0, {p.numel()})")
        if masks:
            check_tensor(f"masks[{i}]", masks[i], device=device, dtypes=(torch.bool,),
                          numel=p.numel())
        state_numel = indices[i].numel() if compact_state else p.numel()
        if first_moments:
            check_tensor(f"{first_moments_name}[{i}]", first_moments[i], device=device,
                          dtypes=(math,), numel=state_numel)
        if second_moments is not None:
            check_tensor(f"exp_avg_sqs[{i}]", second_moments[i], device=device,
                          dtypes=(math,), numel=state_numel)
        if max_second_moments:
            check_tensor(f"max_exp_avg_sqs[{i}]", max_second_moments[i], device=device,
                          dtypes=(math,), numel=state_numel)
        if ages:
            check_tensor(f"ages[{i}]", ages[i], device=device, dtypes=(torch.int32,),
                          numel=state_numel)
        if steps:
            s = steps[i]
            if s.numel() != 1 or s.dtype != torch.float32 or s.device not in (
                    device, torch.device("cpu")):
                raise ValueError(f"steps[{i}] must be a float32 scalar on {device} or the CPU")


def check_lr(lr, lr_tensor, params):
    check_number("lr", lr, 0.0)
    if lr_tensor is not None:
        if not isinstance(lr_tensor, torch.Tensor) or lr_tensor.numel() != 1 or \
                lr_tensor.dtype != torch.float32:
            raise TypeError("lr_tensor must be a float32 tensor with one element")
        if params and lr_tensor.device != params[0].device:
            raise ValueError(f"lr_tensor is on {lr_tensor.device}, expected {params[0].device}")


def check_amp(amp_scale, found_inf, tensors):
    """Mixed precision (torch.amp.GradScaler): the loss scale and the inf flag, each a
    float32 scalar on the tensors' device, or None."""
    for name, t in (("amp_scale", amp_scale), ("found_inf", found_inf)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor with one element")
        if tensors and t.device != tensors[0].device:
            raise ValueError(f"{name} is on {t.device}, expected {tensors[0].device}")


def check_adam_numbers(params, lr, lr_tensor, beta1, beta2, eps, weight_decay, grad_scale):
    check_lr(lr, lr_tensor, params)
    check_number("beta1", beta1, 0.0, 1.0)
    check_number("beta2", beta2, 0.0, 1.0)
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if beta == 1.0:  # the bias correction 1 - beta**t would be 0: torch.optim refuses
            raise ValueError(f"{name} must be in [0, 1), got {beta}")
    check_number("eps", eps, 0.0)
    check_number("weight_decay", weight_decay, 0.0)
    check_number("grad_scale", grad_scale)


# ----------------------------------------------------------------------------------
# update family
