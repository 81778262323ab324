"""The tensors one kernel call of an optimizer step works on."""


def contiguous(tensors):
    """The tensors themselves where contiguous, contiguous copies of the others (a
    param's copy is written back after the step)."""
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


class Work:
    """The tensors one kernel call works on: contiguous params (copies for
    non-contiguous ones, written back afterwards: an in-place kernel never updates a
    temporary silently), their contiguous grads and their state dicts. With fp32
    master weights (`masters[i]`, or None) the kernels update the master, reading
    the grad in fp32, and the param gets the master rounded at write_back."""

    def __init__(self, params, grads, states, masters=None):
        self.params = params
        self.contiguous_params = contiguous(params)
        self.grads = grads
        self.states = states
        if masters is not None:
            self.contiguous_params = [c if m is None else m
                                      for c, m in zip(self.contiguous_params, masters)]
            self.grads = [g if m is None or g.dtype == m.dtype else g.to(m.dtype)
                          for g, m in zip(grads, masters)]

    def write_back(self):
        for p, v in zip(self.params, self.contiguous_params):
            if v is not p:
                p.copy_(v)
