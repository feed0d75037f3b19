"""The training and evaluation loop: plain PyTorch, no Ray imports.

Read top to bottom in the order a run travels: precision and device → learning-rate
schedule → EMA → building the model and optimizer → one training epoch → evaluation (with
optional test-time augmentation) → checkpoint state → `fit`, the loop over epochs.

Distribution is the caller's business: it passes `wrap` (e.g. Ray's `prepare_model`, which
adds DDP when there are several workers), `rank`/`world_size` for the data shards, and a
`Reporter` that is told about progress and epoch ends. Metrics are summed over ranks with
`torch.distributed` when a process group exists, so every rank sees the same numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cifar_ray import checkpoint
from cifar_ray.config import Config, OptimConfig, to_dict
from cifar_ray.data.augment import normalize
from cifar_ray.data.loader import DeviceLoader, derive_seed
from cifar_ray.data.split import Split
from cifar_ray.models import create_model

INIT_SAMPLE = 5000  # training images shown to data-dependent init (e.g. patch whitening)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


# ---------------------------------------------------------------- precision, device

def pick_device(gpu: bool, local_rank: int = 0) -> torch.device:
    if gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("a GPU was asked for but CUDA is not available on this node")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware has it, fp16 (with a grad scaler) on older GPUs, else fp32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # CPU: bf16 autocast only pays where the cores have native bf16 (AVX512-BF16 / AMX).
    return torch.bfloat16 if _cpu_has_bf16() else None


def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------- learning-rate schedule

def lr_at(optim: OptimConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate of global step `step`: a pure function, so resume needs only `step`.

    Warmup rises linearly over `warmup_epochs`; then onecycle falls linearly to zero,
    cosine follows a half cosine to zero, step multiplies by `step_gamma` every
    `step_every` epochs, constant stays."""
    warm = int(round(optim.warmup_epochs * steps_per_epoch))
    peak = optim.lr
    if step < warm:
        return peak * (step + 1) / warm
    if optim.schedule == "constant":
        return peak
    if optim.schedule == "step":
        return peak * optim.step_gamma ** ((step // steps_per_epoch) // optim.step_every)
    frac = (step - warm) / max(1, total_steps - warm)
    frac = min(max(frac, 0.0), 1.0)
    if optim.schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * frac))
    return peak * (1 - frac)  # onecycle: linear rise (warmup), linear fall


# ---------------------------------------------------------------- EMA of weights

class EMA:
    """Exponential moving average of parameters and buffers, used for evaluation."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)


class Lookahead:
    """Lookahead on the weights: every `every` steps a slow copy moves toward the live
    weights (slow <- d*slow + (1-d)*live) and training restarts from it (live <- slow).

    d grows as `decay` * progress**3: early on the slow copy just follows; late in training
    it averages out the noise of the last steps, as an EMA would, but the live weights feel
    it too. After the last step the live weights are the slow ones. BatchNorm's running
    statistics (floating-point buffers) are averaged along with the parameters."""

    def __init__(self, model: nn.Module, every: int, decay: float):
        self.every, self.decay = every, decay
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items()
                     if v.dtype.is_floating_point}

    @torch.no_grad()
    def step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Call after optimizer step number `step` (counted from 1) of `total_steps`."""
        last = step >= total_steps
        if step % self.every and not last:
            return
        d = 1.0 if last else self.decay * (step / total_steps) ** 3
        state = model.state_dict()
        slow, live = list(self.slow.values()), [state[k] for k in self.slow]
        torch._foreach_lerp_(slow, live, 1 - d)  # one fused launch per op, not one per tensor
        torch._foreach_copy_(live, slow)

    def state_dict(self) -> dict:
        return self.slow

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.slow[k].copy_(v)


# ---------------------------------------------------------------- building

def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def make_model(cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    model = create_model(cfg.model.spec or cfg.model.name, num_classes=num_classes, **cfg.model.args)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def init_from_data(model: nn.Module, x: torch.Tensor) -> None:
    """Data-dependent init: each submodule with an `init_from_data(inputs)` method (e.g. the
    patch-whitening layer) is called with the batch that reaches it in one forward pass of
    the images `x`; the pass stops after the last such module."""
    targets = [m for m in model.modules() if hasattr(m, "init_from_data")]
    if not targets:
        return

    class _Done(Exception):
        pass

    def stop(module, args, output):
        raise _Done

    handles = [m.register_forward_pre_hook(lambda m, args: m.init_from_data(args[0]))
               for m in targets]
    handles.append(targets[-1].register_forward_hook(stop))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Parameter groups by kind: weights (ndim > 1), BatchNorm parameters (lr times
    `norm_lr_scale`) and other 1-D parameters (biases). In PyTorch's units only weights decay
    (decay only fights a bias's or norm's scale). In decoupled units (`optim.decoupled`,
    sgd) every kind decays by the same amount per step whatever its lr. Kinds with equal
    settings share a group. Each group keeps its `lr_scale`: its lr is the schedule's times it."""
    o = cfg.optim
    decoupled = o.decoupled and o.name == "sgd"
    # Nesterov SGD's steps settle at 1 + 1/(1 - momentum) gradients; decoupled lr divides it out.
    unit = cfg.train.batch_size / (1024 * (1 + 1 / (1 - o.momentum))) if decoupled else 1.0
    norms = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in m.parameters(recurse=False)}

    def settings(p) -> tuple[float, float]:  # (lr scale, weight decay)
        kind = "weight" if p.ndim > 1 else "norm" if id(p) in norms else "bias"
        scale = unit * (o.norm_lr_scale if kind == "norm" else 1.0)
        if decoupled:  # per-step shrink lr_group * wd = weight_decay * unit for every group
            return scale, (o.weight_decay * unit / (o.lr * scale) if o.lr * scale > 0 else 0.0)
        return scale, o.weight_decay if kind == "weight" else 0.0

    params = list(model.parameters())
    keys = [settings(p) for p in params]
    order = []  # the weights' group first, then the others by first appearance
    for p, key in sorted(zip(params, keys), key=lambda pk: pk[0].ndim <= 1):
        if key not in order:
            order.append(key)
    groups = [{"params": [p for p, key in zip(params, keys) if key == k], "lr": o.lr * k[0],
               "lr_scale": k[0], "weight_decay": k[1]} for k in order]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.momentum, 0.999))
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


# ---------------------------------------------------------------- distributed helpers

def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (identity without a process group)."""
    if not _dist():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------- reporting

class Reporter(Protocol):
    def progress(self, epoch: int, step: int, steps: int) -> None:
        """Called on every rank every few steps inside an epoch (show rank 0's)."""

    def epoch_end(self, metrics: dict, state: Callable[[], dict] | None) -> None:
        """Called on every rank after each epoch (a barrier in Ray). `state()` builds the
        checkpoint state; it is passed on rank 0 only."""


class NullReporter:
    def progress(self, epoch, step, steps):
        pass

    def epoch_end(self, metrics, state):
        pass


# ---------------------------------------------------------------- one epoch

@dataclass
class Loop:
    """Everything one run trains with; built once, mutated by `train_epoch`."""
    cfg: Config
    model: nn.Module  # possibly wrapped (DDP, compile)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None
    device: torch.device
    amp: torch.dtype | None
    step: int = 0  # global optimizer steps done
    lookahead: Lookahead | None = None


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def train_epoch(loop: Loop, loader: DeviceLoader, epoch: int, total_steps: int,
                reporter: Reporter) -> dict:
    cfg, model, opt = loop.cfg, loop.model, loop.optimizer
    model.train()
    loader.set_epoch(epoch)
    steps = len(loader)
    loss_sum = torch.zeros((), device=loop.device, dtype=torch.float64)
    correct = torch.zeros((), device=loop.device, dtype=torch.int64)
    seen = 0
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        lr = lr_at(cfg.optim, loop.step, total_steps, steps)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        with _autocast(loop.device, loop.amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.optim.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        if cfg.optim.grad_clip > 0:
            loop.scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        loop.scaler.step(opt)
        loop.scaler.update()
        loop.step += 1
        if loop.lookahead is not None:
            loop.lookahead.step(unwrap(model), loop.step, total_steps)
        if loop.ema is not None:
            loop.ema.update(unwrap(model))
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        # Checking finiteness costs a device sync: do it every few steps, not every step,
        # and agree across ranks so that all of them stop together.
        if cfg.train.fail_on_nan and (i % 10 == 0 or i == steps - 1):
            bad = all_sum([0.0 if torch.isfinite(loss).item() else 1.0], loop.device)[0]
            if bad:
                raise NonFiniteLoss(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}/{steps}; "
                    "lower optim.lr or set optim.grad_clip (e.g. --set optim.grad_clip=1.0)")
        if i % 5 == 0 or i == steps - 1:
            reporter.progress(epoch, i + 1, steps)
    if loop.device.type == "cuda":
        torch.cuda.synchronize(loop.device)  # the epoch's time includes its queued GPU work
    seconds = time.perf_counter() - t0
    loss_total, correct_total, seen_total = all_sum(
        [loss_sum.item(), float(correct.item()), float(seen)], loop.device)
    return {
        "train_loss": loss_total / max(seen_total, 1),
        "train_acc": correct_total / max(seen_total, 1),
        "lr": opt.param_groups[0]["lr"],
        "images_per_s": seen_total / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
    }


# ---------------------------------------------------------------- evaluation

def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """Test-time views: the image, its mirror, and both shifted by one pixel (reflect pad)."""
    flipped = x.flip(-1)
    views = [x, flipped]
    for v in (x, flipped):
        padded = F.pad(v, (1, 1, 1, 1), mode="reflect")
        views += [padded[..., :-2, :-2], padded[..., 2:, 2:]]
    return views


def predict_logits(model: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Logits for a normalized batch; with `tta`, the mean over `tta_views`."""
    if not tta:
        return model(x).float()
    views = tta_views(x)
    return torch.stack([model(v.contiguous(memory_format=torch.channels_last)
                              if x.is_contiguous(memory_format=torch.channels_last) else v).float()
                        for v in views]).mean(0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DeviceLoader, device: torch.device,
             amp: torch.dtype | None, num_classes: int, tta: bool = False) -> dict:
    """Loss, accuracy and confusion matrix over the loader, summed over all ranks."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    for x, y in loader:
        with _autocast(device, amp):
            logits = predict_logits(model, x, tta)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + logits.argmax(1),
                                    minlength=num_classes * num_classes)
    if _dist():
        torch.distributed.all_reduce(loss_sum)
        torch.distributed.all_reduce(confusion)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = int(confusion.sum())
    return {"loss": loss_sum.item() / max(n, 1), "acc": confusion.diag().sum().item() / max(n, 1),
            "n": n, "confusion": confusion.numpy()}


# ---------------------------------------------------------------- checkpoint state

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- the loop over epochs

def fit(cfg: Config, data: Split, *, device: torch.device, rank: int = 0,
        world_size: int = 1, wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
        resume: dict | None = None, reporter: Reporter = NullReporter()) -> list[dict]:
    """Train `cfg.train.epochs` epochs (continuing from `resume` state) and return the
    metrics history, one dict per epoch. Raises NonFiniteLoss on a NaN/inf loss."""
    torch.manual_seed(cfg.train.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels
    num_classes = len(data.classes)
    model = make_model(cfg, num_classes, device)
    per_worker = max(1, cfg.train.batch_size // world_size)
    common = dict(device=device, mean=data.mean, std=data.std, seed=cfg.train.seed,
                  rank=rank, world_size=world_size, channels_last=cfg.train.channels_last)
    train_loader = DeviceLoader(*data.train, batch_size=per_worker, aug=cfg.aug,
                                shuffle=True, drop_last=True, **common)
    eval_kw = dict(batch_size=cfg.train.eval_batch_size, aug=None, shuffle=False,
                   drop_last=False, **common)
    val_loader = DeviceLoader(*data.val, **eval_kw) if len(data.val[1]) else None
    optimizer = build_optimizer(cfg, model)
    amp = autocast_dtype(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    if resume is None and any(hasattr(m, "init_from_data") for m in model.modules()):
        # A seeded sample of training images, the same on every rank.
        gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, "init"))
        idx = torch.randperm(len(train_loader.images), generator=gen)[:INIT_SAMPLE]
        init_from_data(model, normalize(train_loader.images[idx.to(device)], data.mean,
                                        data.std, channels_last=cfg.train.channels_last))
    ema = EMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    lookahead = (Lookahead(model, cfg.optim.lookahead_every, cfg.optim.lookahead_decay)
                 if cfg.optim.lookahead_every > 0 else None)

    history: list[dict] = []
    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        if ema is not None and resume.get("ema"):
            ema.load_state_dict(resume["ema"])
        if lookahead is not None and resume.get("lookahead"):
            lookahead.load_state_dict(resume["lookahead"])
        history = list(resume["history"])
        start_epoch = resume["epoch"]
        set_rng_state(resume["rng"])

    wrapped = wrap(model)
    if cfg.train.compile:
        wrapped = torch.compile(wrapped)
    loop = Loop(cfg, wrapped, optimizer, scaler, ema, device, amp,
                step=resume["step"] if resume else 0, lookahead=lookahead)
    total_steps = cfg.train.epochs * len(train_loader)

    for epoch in range(start_epoch, cfg.train.epochs):
        metrics = {"epoch": epoch + 1, **train_epoch(loop, train_loader, epoch, total_steps,
                                                    reporter)}
        t0 = time.perf_counter()
        eval_model = _ema_model(loop, model) if ema is not None else wrapped
        if val_loader is not None:
            ev = evaluate(eval_model, val_loader, device, amp, num_classes, cfg.train.tta)
            metrics.update(val_loss=ev["loss"], val_acc=ev["acc"])
        else:
            metrics.update(val_loss=float("nan"), val_acc=float("nan"))
        if epoch + 1 == cfg.train.epochs and data.test is not None:
            test = evaluate(eval_model, DeviceLoader(*data.test, **eval_kw), device, amp,
                            num_classes, cfg.train.tta)
            metrics["test_acc"] = test["acc"]
        metrics["eval_seconds"] = time.perf_counter() - t0
        metrics["chance"] = 1 / num_classes
        history.append(metrics)
        state_fn = None
        if rank == 0:
            def state_fn(epoch=epoch, history=list(history)):
                return {
                    "format": checkpoint.FORMAT, "epoch": epoch + 1, "step": loop.step,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "ema": ema.state_dict() if ema is not None else None,
                    "lookahead": lookahead.state_dict() if lookahead is not None else None,
                    "rng": rng_state(), "config": to_dict(cfg), "classes": list(data.classes),
                    "mean": list(data.mean), "std": list(data.std), "history": history,
                }
        reporter.epoch_end(metrics, state_fn)
    return history


def _ema_model(loop: Loop, model: nn.Module) -> nn.Module:
    """A copy of the model holding the EMA weights (evaluation only)."""
    import copy

    shadow = copy.deepcopy(model)
    shadow.load_state_dict(loop.ema.state_dict())
    return shadow
