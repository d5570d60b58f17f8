"""A model with batch norm trains as plain PyTorch trains it, per model and in rounds.

In training, batch norm updates its running statistics in place. Every tensor of a bank is
a view of one buffer, and views share autograd's version counter: an in-place update of a
buffer used to bump the version of the weights saved for the backward pass, and every
training step of such a model failed ("modified by an inplace operation")."""

from __future__ import annotations

import torch
from torch import nn

from examples.models import bn_cnn
from tests.unit.runtimes import runtime_for

K = 4
GROUP = {"name": "bn", "factory": "examples.models:bn_cnn", "kwargs": {"width": 4}, "count": K,
         "input": {"shape": [-1, 3, 32, 32], "dtype": "float32"}, "loss": "cross_entropy",
         "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "init": {"seed": 3}}


def plain(k: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(3 + k)
    model = bn_cnn(width=4)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def test_train_steps_and_rounds_of_a_batch_norm_model_follow_plain_pytorch() -> None:
    rt, bank = runtime_for(GROUP)
    try:
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randn(K, 6, 3, 32, 32, generator=g), torch.randint(0, 10, (K, 6), generator=g))
                   for _ in range(3)]
        references = [plain(k) for k in range(K)]
        for step, (xs, ts) in enumerate(batches):
            if step == 0:
                got = torch.stack([rt.train_step(k, xs[k], ts[k]) for k in range(K)])
            else:
                got = rt.train_round(list(range(K)), xs, ts)
            for k, (model, opt) in enumerate(references):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xs[k]), ts[k])
                loss.backward()
                opt.step()
                assert abs(float(got[k]) - loss.item()) < 1e-4, (step, k)
        for k, (model, _) in enumerate(references):
            for name, value in model.state_dict().items():
                torch.testing.assert_close(bank.tensors[name][k], value.to(bank.tensors[name].dtype), atol=1e-4,
                                           rtol=1e-4, msg=lambda m, name=name, k=k: f"model {k} {name}: {m}")
    finally:
        bank.close()
