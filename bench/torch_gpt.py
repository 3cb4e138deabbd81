"""A plain PyTorch twin of gptneo.model.gpt.GPT, for throughput comparisons only.

Same architecture, shapes, init and parameter count as the mtf model:
learned token + position embeddings, pre-LayerNorm blocks, q/k/v projections without bias,
attention output projection and MLP with bias, GELU (tanh approximation), final LayerNorm,
output projection tied to the token embedding. The optimizer mirrors gptneo.optim.Adam
(AdamW, decay on matrices only, i.e. rank >= 2, the embeddings included), with global-norm
clipping and the cosine schedule of `learning_rate_schedule`. `train_step` runs float32 or,
with `autocast_dtype`, bfloat16 activations over float32 weights (as gptneo's
train.precision = "bfloat16").
"""
import math

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):

  def __init__(self, n_embd, n_head, n_layer, mlp_ratio, init_std, eps, attention):
    super().__init__()
    self.n_head, self.attention = n_head, attention
    self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
    self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)  # q, k, v stacked: 3 e*e, no bias
    self.out = nn.Linear(n_embd, n_embd)
    self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
    self.fc = nn.Linear(n_embd, mlp_ratio * n_embd)
    self.proj = nn.Linear(mlp_ratio * n_embd, n_embd)
    out_std = init_std / math.sqrt(2 * n_layer)  # scale_by_depth
    for linear, std in ((self.qkv, init_std), (self.out, out_std), (self.fc, init_std),
                        (self.proj, out_std)):
      nn.init.normal_(linear.weight, std=std)
      if linear.bias is not None:
        nn.init.zeros_(linear.bias)

  def _attend(self, x):
    b, t, e = x.shape
    q, k, v = self.qkv(x).split(e, dim=2)
    q, k, v = (z.view(b, t, self.n_head, e // self.n_head).transpose(1, 2) for z in (q, k, v))
    if self.attention == "sdpa":
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:  # "manual": the same math as gpt.py, scores + causal bias, softmax, weighted sum
      scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
      mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
      y = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
    return self.out(y.transpose(1, 2).reshape(b, t, e))

  def forward(self, x):
    x = x + self._attend(self.ln_1(x))
    return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
  """The PyTorch twin; arguments as gptneo.model.gpt.GPT (tied embeddings, no dropout)."""

  def __init__(self, n_layer, n_embd, n_head, n_ctx, n_vocab, mlp_ratio=4, init_std=0.02,
               layer_norm_epsilon=1e-5, attention="sdpa"):
    super().__init__()
    self.wte = nn.Parameter(torch.randn(n_vocab, n_embd) * init_std)
    self.wpe = nn.Parameter(torch.randn(n_ctx, n_embd) * (init_std / 2))
    self.blocks = nn.ModuleList(
        Block(n_embd, n_head, n_layer, mlp_ratio, init_std, layer_norm_epsilon, attention)
        for _ in range(n_layer))
    self.ln_f = nn.LayerNorm(n_embd, eps=layer_norm_epsilon)

  def num_parameters(self):
    return sum(p.numel() for p in self.parameters())

  def forward(self, tokens):
    x = self.wte[tokens] + self.wpe[:tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.ln_f(x) @ self.wte.t()  # tied output projection


def make_optimizer(model, learning_rate=6e-4, beta1=0.9, beta2=0.95, epsilon=1e-8,
                   weight_decay=0.1):
  """AdamW as gptneo's Adam: decoupled decay (times the learning rate) on rank >= 2 only."""
  params = list(model.parameters())
  groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), eps=epsilon)


def learning_rate(step, total_steps, peak=6e-4, warmup_steps=0, min_ratio=0.1):
  """gptneo.optim.optimizers.learning_rate_schedule with decay='cosine'."""
  warmup = min(1.0, (step + 1.0) / max(warmup_steps, 1))
  progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1.0), 0.0), 1.0)
  return peak * warmup * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi *
                                                                               progress)))


def train_step(model, optimizer, batch, step, total_steps, peak_lr, clip_norm=1.0,
               autocast_dtype=None):
  """One step on a [batch, n_ctx + 1] int64 window batch; returns the loss (a tensor).

  `model` may be the TorchGPT or its torch.compile wrapper. With autocast_dtype (e.g.
  torch.bfloat16) the forward and the loss run under torch.autocast("cpu"); parameters,
  gradients and the AdamW state stay float32.
  """
  for group in optimizer.param_groups:
    group["lr"] = learning_rate(step, total_steps, peak_lr)
  with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                      enabled=autocast_dtype is not None):
    logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
  optimizer.zero_grad(set_to_none=True)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
  optimizer.step()
  return loss
