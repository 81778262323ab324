"""The CUDA kernels against the CPU ones (GPU only): the incremental optimizer in
every mode of test_optim_incremental.py stepped on both devices with the same
gradients (the same chosen positions, close params, equal ages), and index
arithmetic past 2^31 elements in the updates (select and topk: test_select.py)."""
import copy

import pytest
import torch
from torch import nn

import incrkern
from incrkern import ops

from test_optim_incremental import MODES, batches, small_model

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("options", MODES)
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_incremental_optimizer_cpu_and_cuda_agree(name, options):
    if name == "SGD" and options.get("amsgrad"):
        pytest.skip("amsgrad is an Adam argument")
    kwargs = dict(momentum=0.9) if name == "SGD" else {}
    model = small_model()
    twin = copy.deepcopy(model).cuda()
    opt = getattr(incrkern.optim, name)(model.parameters(), lr=1e-2, **kwargs, **options)
    topt = getattr(incrkern.optim, name)(twin.parameters(), lr=1e-2, **kwargs, **options)
    for i, (x, y) in enumerate(batches(8)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.cuda()
        for o in (opt, topt):  # select="layer" draws its layers from the global generator
            torch.manual_seed(100 + i)
            o.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-5, atol=1e-6)
    state, tstate = opt.state_dict()["state"], topt.state_dict()["state"]
    for i in state:
        for key, value in state[i].items():
            if not torch.is_tensor(value):
                continue
            other = tstate[i][key].cpu()
            if key in ("indices", "age", "layer_chosen") or not value.is_floating_point():
                assert torch.equal(other, value), key
            else:
                torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6, msg=key)


def _big_bf16(n):
    try:
        return torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")


def test_updates_past_2_31():
    """The indexed and the dense Adam update reach elements past 2^31 (bf16 params
    and grads, fp32 moments: 24 GiB)."""
    n = 2**31 + 5
    p, g = _big_bf16(n), _big_bf16(n)
    try:
        m = torch.zeros(n, device="cuda")
        v = torch.zeros(n, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    far = [3, 2**31 + 1, n - 1]
    g[far] = 1.0
    steps = [torch.zeros((), device="cuda")]
    idx = torch.tensor(far, device="cuda")
    ops.adam_update_([p], [g], [m], [v], steps, lr=0.5, indices=[idx], increment_steps=True)
    torch.cuda.synchronize()
    assert p[far].float().tolist() == [-0.5] * 3  # Adam's first step moves by lr
    assert int((p != 0).sum()) == 3
    ops.adam_update_([p], [g], [m], [v], steps, lr=0.5, increment_steps=True)
    torch.cuda.synchronize()
    assert float(m[n - 1]) == pytest.approx(0.19)  # 0.9 * 0.1 + 0.1
    assert float(m[n - 2]) == 0.0 and float(v[2**31]) == 0.0
