"""BatchNorm over the global batch when several workers train one model.

Data-parallel workers each see a share of a global batch. Plain BatchNorm would normalise every share by its
own statistics and keep rank 0's running statistics, so 1 and N workers would train different models. Here
the training statistics are those of the whole global batch: torch's ``SyncBatchNorm`` on CUDA, and on other
devices (torch's ``SyncBatchNorm`` refuses the CPU) :class:`GlobalBatchNorm`, which all-reduces the per-channel
sums through ``torch.distributed`` with autograd, so gradients also flow through the shared statistics.
Eval mode (the training attack, validation, the frozen models) uses the running statistics, as BatchNorm does.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)


def has_batchnorm(module: nn.Module) -> bool:
    """Whether any layer of ``module`` keeps batch statistics."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """A sum over the process group whose gradient is the sum of the group's gradients (every worker's loss
    depends on every worker's rows through the shared statistics)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``tensor`` over the process group."""
    return _AllReduceSum.apply(tensor)


class GlobalBatchNorm(_BatchNorm):
    """A BatchNorm layer (any dimension) whose training statistics are the global batch's, on any device.

    Two all-reduces per layer and step: the per-channel sums with the row count (the mean), then the sums of
    squared deviations from that mean (the variance, two-pass for accuracy). Running statistics are updated
    from the global values (unbiased variance, as BatchNorm does), so every worker keeps the same ones.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or _group_size() <= 1:
            return super().forward(input)
        self._check_input_dim(input)
        x = input.float()  # statistics in float32 whatever the input's precision (the row count stays exact)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        view = (1, channels) + (1,) * (x.dim() - 2)
        rows = torch.tensor([x.numel() / channels], dtype=torch.float32, device=x.device)
        sums = all_reduce(torch.cat([x.sum(dims), rows]))
        count = sums[-1]
        mean = sums[:channels] / count
        centred = x - mean.view(view)
        var = all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            self._update_running(mean.detach(), var.detach(), count.detach())
        out = centred * torch.rsqrt(var + self.eps).view(view)
        if self.affine:
            out = out * self.weight.view(view) + self.bias.view(view)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * count / (count - 1).clamp_min(1.0)
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


#: The layers converted: torch's own BatchNorm types. A subclass (timm's BatchNormAct2d adds an activation) is
#: left as it is, with a warning, rather than converted into something that drops what it adds.
PLAIN_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _convert(module: nn.Module, layer: type[_BatchNorm]) -> nn.Module:
    """``module`` with each of torch's own BatchNorm layers replaced by ``layer`` (same state, same trainability)."""
    if type(module) in PLAIN_BATCHNORM:
        out = layer(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        out.load_state_dict(module.state_dict())
        for mine, theirs in zip(out.parameters(), module.parameters(), strict=True):
            mine.requires_grad_(theirs.requires_grad)
        return out.to(next(iter(module.state_dict().values())).device).train(module.training)
    for name, child in module.named_children():
        module.add_module(name, _convert(child, layer))
    return module


def unconverted_batchnorm(module: nn.Module) -> list[str]:
    """Names of the BatchNorm subclasses in ``module`` that :func:`global_batchnorm` leaves per worker."""
    plain = (*PLAIN_BATCHNORM, GlobalBatchNorm, nn.SyncBatchNorm)
    return sorted({type(m).__name__ for m in module.modules() if isinstance(m, _BatchNorm) and type(m) not in plain})


def global_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer taking its training statistics over the worker group (the layers'
    parameter and buffer names are unchanged, so the state dict loads into the original architecture)."""
    if not has_batchnorm(module):
        return module
    converted = _convert(module, nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm)
    left = unconverted_batchnorm(converted)
    if left:
        log.warning(
            "BatchNorm layers of types %s keep each worker's own statistics: the model depends on the worker count",
            ", ".join(left),
        )
    return converted
