"""The Python API on a torch module: infer the spec of torchvision's resnet18 (random init, random
BatchNorm statistics), permute its state_dict at random, reload, and compare outputs.

    .venv/bin/python examples/torch_api.py
"""

import copy

import torch
import torchvision

import rebasin

torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10).eval()
for m in model.modules():  # non-trivial BatchNorm statistics
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.5)
        m.running_var.uniform_(0.5, 2.0)
x = torch.randn(2, 3, 32, 32)

spec = rebasin.infer_spec(model, example_inputs=(x,))
print(spec)

perms = spec.random_permutations(seed=0)
sd = rebasin.apply_permutation(model.state_dict(), spec, perms)   # a new state_dict
model2 = copy.deepcopy(model)
model2.load_state_dict(sd)
with torch.no_grad():
    a, b = model(x), model2(x)
print(f"\nweights changed: {not torch.equal(model.conv1.weight, model2.conv1.weight)}; "
      f"max |output difference| = {(a - b).abs().max().item():.2e}")
print(rebasin.verify_torch(model, sd, (x,)))
