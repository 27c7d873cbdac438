"""Training step (forward + backward) of one adapted 1024x1024 layer, T=4096: moreft.inject vs peft.get_peft_model."""
import statistics, sys, time
import torch
from torch import nn
import moreft
torch.set_num_threads(2)
IN = OUT = 1024; T = 4096

class One(nn.Module):
    def __init__(self):
        super().__init__(); self.lin = nn.Linear(IN, OUT)
    def forward(self, x): return self.lin(x)

def build(kind):
    torch.manual_seed(0); m = One()
    cfg = moreft.MoReConfig(target_modules=["lin"], nblocks=4, block_rank=8)
    if kind == "inject":
        return moreft.inject(m, cfg)
    import peft
    if kind == "peftlora":
        return peft.get_peft_model(m, peft.LoraConfig(target_modules=["lin"], r=8, lora_alpha=16))
    return peft.get_peft_model(m, cfg)

kinds = sys.argv[1].split(",")
rounds = int(sys.argv[2])
models = {k: build(k) for k in kinds}
gen = torch.Generator().manual_seed(1)
x = torch.randn(T, IN, generator=gen).requires_grad_(True); g = torch.randn(T, OUT, generator=gen)
def step(m):
    x.grad = None
    for p in m.parameters(): p.grad = None
    m(x).backward(g)
times = {k: [] for k in kinds}
for k in kinds:
    for _ in range(3): step(models[k])
for r in range(rounds):
    for k in (kinds if r % 2 == 0 else kinds[::-1]):
        t0 = time.perf_counter(); step(models[k]); times[k].append(time.perf_counter() - t0)
for k in kinds:
    print(k, "median_ms", round(statistics.median(times[k]) * 1e3, 2))
for k in kinds[1:]:
    ratios = [a / b for a, b in zip(times[k], times[kinds[0]])]
    print(f"paired median ratio {k}/{kinds[0]}:", round(statistics.median(ratios), 4))
