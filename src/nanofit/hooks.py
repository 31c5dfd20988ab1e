"""Forward hooks that clean up after themselves, and a model summary computed with them."""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import nn

from .torch_utils import eval_mode, preserved_rng, to_device

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ["Hook", "Hooks", "select_modules", "ModelSummary", "model_summary", "learner_summary",
           "first_tensor", "append_stats", "get_hist", "get_min"]

HookFunc = Callable[["Hook", nn.Module, tuple, Any], None]


class Hook:
    """A forward hook on `module` that calls `fn(hook, module, inp, outp)` after each forward.

    Remove it with `remove()`, by leaving a `with Hook(...) as h:` block, or by dropping the
    last reference to it: the module only holds a weak reference, so a forgotten Hook cannot
    keep firing (or keep its data alive) after it is garbage-collected. Keep a reference (a
    variable, a list, `Hooks`) for as long as it should fire. `fn` may keep state on the hook,
    as the course's hook functions do: `hook.stats = ([], [], [])`.
    """

    def __init__(self, module: nn.Module, fn: HookFunc) -> None:
        self.module = module
        self.fn = fn
        ref = weakref.ref(self)

        def call(mod: nn.Module, inp: tuple, outp: Any) -> None:
            hook = ref()
            if hook is not None:
                hook.fn(hook, mod, inp, outp)

        self.handle = module.register_forward_hook(call)

    def remove(self) -> None:
        """Unregister the hook (safe to call twice)."""
        self.handle.remove()

    def __enter__(self) -> Hook:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __del__(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None:
            handle.remove()


class Hooks(Sequence[Hook]):
    """One Hook per module, kept as a list (as miniai's `Hooks`); a context manager that
    removes them all.

    `Hooks(modules, fn)` takes any iterable of modules (a list, a generator, an
    `nn.Sequential`, whose children it hooks) and the course's `fn(hook, module, inp, outp)`.
    `hooks[i]`, `hooks[a:b]` (a list), `len(hooks)`, `for h in hooks`, `h in hooks` work as on
    a list; `del hooks[i]` also removes that hook from its module. State a hook function keeps
    on the hook (the course's `hook.stats = ...`) stays readable after the hooks are removed.
    Example: `with Hooks(model, append_stats) as hooks: fit(model)`, then `hooks[0].stats`.
    `hook_type(module, fn)` makes each hook (a Hook subclass, say); by default `Hook`.
    """

    def __init__(self, modules: Iterable[nn.Module], fn: HookFunc, *,
                 hook_type: Callable[[nn.Module, HookFunc], Hook] = Hook) -> None:
        self.hooks = [hook_type(m, fn) for m in modules]

    @overload
    def __getitem__(self, i: int) -> Hook: ...

    @overload
    def __getitem__(self, i: slice) -> list[Hook]: ...

    def __getitem__(self, i: int | slice) -> Hook | list[Hook]:
        return self.hooks[i]

    def __delitem__(self, i: int | slice) -> None:
        """Remove the hook(s) at `i` from their modules and from this list."""
        for h in self.hooks[i] if isinstance(i, slice) else [self.hooks[i]]:
            h.remove()
        del self.hooks[i]

    def __len__(self) -> int:
        return len(self.hooks)

    def __iter__(self) -> Iterator[Hook]:
        return iter(self.hooks)

    def __repr__(self) -> str:
        return f"Hooks({[type(h.module).__name__ for h in self.hooks]})"

    def remove(self) -> None:
        """Unregister every hook (safe to call twice); the Hook objects and their state stay."""
        for h in self.hooks:
            h.remove()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def select_modules(model: nn.Module, mod_filter: Any = None) -> list[nn.Module]:
    """The modules of `model` passing `mod_filter`: a module type, a tuple of types, or a
    predicate; with no filter, every leaf module (one with no children)."""
    if mod_filter is None:
        return [m for m in model.modules() if not any(True for _ in m.children())]
    if isinstance(mod_filter, type) or (isinstance(mod_filter, tuple)
                                        and all(isinstance(t, type) for t in mod_filter)):
        return [m for m in model.modules() if isinstance(m, mod_filter)]
    if callable(mod_filter):
        return [m for m in model.modules() if mod_filter(m)]
    raise TypeError(f"mod_filter must be a module type, a tuple of types or a function of a "
                    f"module, got {mod_filter!r}")


def first_tensor(x: Any) -> torch.Tensor | None:
    """The first tensor in `x` (a tensor, or tuples, lists and dicts of them), or None."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        for item in x:
            t = first_tensor(item)
            if t is not None:
                return t
    if isinstance(x, dict):
        return first_tensor(list(x.values()))
    return None


def _flops_per_item(module: nn.Module, outp: torch.Tensor | None) -> int:
    """Multiply-accumulates per input item for the layers that dominate the cost."""
    if outp is None:
        return 0
    if isinstance(module, nn.Linear):
        return module.weight.numel() * (outp[0].numel() // module.out_features)
    if isinstance(module, nn.modules.conv._ConvNd):
        spatial = outp[0].numel() // module.out_channels  # output positions per item
        return module.weight.numel() * spatial
    return 0


@dataclass
class ModelSummary:
    """The rows of `model_summary`: module, output shape, parameters, MFLOPs per item."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    total_params: int = 0
    trainable_params: int = 0
    show_flops: bool = True

    def __str__(self) -> str:
        head = ["module", "output shape", "params"] + (["MFLOPs"] if self.show_flops else [])
        table = [head] + [
            [r["module"], str(r["output_shape"]), f"{r['params']:,}"]
            + ([f"{r['mflops']:.3f}"] if self.show_flops else []) for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"total params {self.total_params:,} (trainable {self.trainable_params:,})")
        return "\n".join(lines)

    __repr__ = __str__


def model_summary(model: nn.Module, *inputs: Any, flops: bool = True) -> ModelSummary:
    """Run `model(*inputs)` once, in eval mode and without gradients, and tabulate each leaf
    module's output shape, own parameter count and MFLOPs per item. The model is unchanged."""
    rows: list[dict[str, Any]] = []
    names = {m: name for name, m in model.named_modules()}

    def record(hook: Hook, module: nn.Module, inp: tuple, outp: Any) -> None:
        t = first_tensor(outp)
        rows.append({"module": f"{names.get(module, '?')} ({type(module).__name__})",
                     "output_shape": tuple(t.shape) if t is not None else None,
                     "params": sum(p.numel() for p in module.parameters(recurse=False)),
                     "mflops": _flops_per_item(module, t) / 1e6})

    # eval mode: batchnorm must not update its running statistics for a summary
    with eval_mode(model), Hooks(select_modules(model), record), torch.no_grad():
        model(*inputs)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelSummary(rows, total, trainable, flops)


def learner_summary(learn: Learner, flops: bool = True) -> ModelSummary:
    """`learn.summary()`: each leaf module's output shape, parameters and MFLOPs per item
    (`flops=False` leaves them out), from one batch of the learner's validation data (or
    training data) run through the model in eval mode. Leaves no trace: the model, its mode
    and every RNG (a shuffling loader draws from one) are as before."""
    dl = getattr(learn.dls, "valid", None) or getattr(learn.dls, "train", None)
    if dl is None:
        raise ValueError("summary needs data to run one batch: pass dls to the Learner")
    with preserved_rng(learn.dls):
        batch = next(iter(dl))
    param = next(learn.model.parameters(), None)
    inputs = batch[: learn.n_inp]
    if param is not None:
        inputs = to_device(inputs, param.device)
    return model_summary(learn.model, *inputs, flops=flops)


# ---- the course's hook helpers (for `Hooks(model, append_stats)`; ActivationStats does this
# on the device, without a host sync per batch) ----------------------------------------------
def append_stats(hook: Any, mod: nn.Module, inp: tuple, outp: Any) -> None:
    """The course's hook function: append the output's mean, std and a 40-bin histogram of
    its absolute values over [0, 10) to `hook.stats` (three lists). Syncs with the device."""
    if not hasattr(hook, "stats"):
        hook.stats = ([], [], [])
    acts = first_tensor(outp)
    if acts is None:
        return
    acts = acts.detach().float().cpu()
    hook.stats[0].append(acts.mean())
    hook.stats[1].append(acts.std())
    hook.stats[2].append(acts.abs().histc(40, 0, 10))


def get_hist(h: Any) -> torch.Tensor:
    """A hook's histograms as a (bins, batches) image, log(1 + count), for `imshow`."""
    return torch.stack(list(h.stats[2])).t().float().log1p()


def get_min(h: Any) -> torch.Tensor:
    """Per batch, the fraction of a hook's activations in the lowest histogram bin."""
    h1 = torch.stack(list(h.stats[2])).t().float()
    return h1[0] / h1.sum(0)
