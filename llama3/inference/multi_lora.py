"""Several LoRA adapters over one base model, chosen per row of a batch.

`LoRASet(model)` holds named adapters (PEFT folders, read by `train.lora.read_peft_adapter`). Once the first
is added, every adaptable projection of the model becomes a `MultiLoRALinear`: the base module (whatever it
is: nn.Linear, the project's matrix-vector kernels, int8/int4 layers) plus every loaded adapter's A and B,
concatenated along the rank: A_all = [A_1; A_2; ...] (ΣR, in), B_all = [B_1, B_2, ...] (out, ΣR). A forward
pass reads one adapter slot per batch row (`LoRASet.select`; 0 = none) and computes

    y = base(x) + B_all ((A_all x) * keep)        (the scale alpha / r folded into B at load)

where `keep` (B, ΣR) is 1 on the rank columns of the row's own adapter and 0 elsewhere: two plain matrix
products for the whole batch, never a Python loop over rows or adapters, and no per-row copy of adapter
weights (gathering A[slot], B[slot] per row cost 1.8x a 100M model's decode step; this costs what
`benchmarks/serve.py --lora-rows` measures). A row without an adapter gets an update of exact zeros, so
base rows and adapted rows share the decode step and base rows keep their numbers bit for bit; when no row
has an adapter the update is skipped. The price: every loaded adapter's (small) A and B are read each step,
so the cost grows with the number of adapters loaded, not with the rows using them.

Fused projections. Inference fuses wq/wk/wv into `wqkv` and w1/w3 into `w13` (fast.py), and the adapters
apply to the fused modules: the per-target adapters of one fused module become one adapter whose A stacks
theirs along the rank ([A_q; A_k; A_v], (r_q + r_k + r_v, in)) and whose B is block-diagonal (each target's B
in its own rows and rank columns). B_fused A_fused x is then exactly [B_q A_q x; B_k A_k x; B_v A_v x], the
concatenation the fused base output needs, and the base keeps its one fused matrix-vector product per step
(unfusing for LoRA would cost every request, adapted or not, the three separate reads fusion saves). A
target the adapter does not train is a zero block. Adapters of different ranks simply take different
numbers of columns.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRASet", "MultiLoRALinear"]


class _Selection:
    """The adapter slot of each batch row for the next forward pass, shared by every MultiLoRALinear."""

    def __init__(self):
        self.rows: torch.Tensor | None = None  # (B,) long; None: every row is the base model
        self._keep: dict[tuple, torch.Tensor] = {}

    def set(self, rows: torch.Tensor | None) -> None:
        self.rows, self._keep = rows, {}

    def keep(self, column_slot: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, ΣR): 1 where a rank column belongs to the row's adapter. Computed once per forward pass for
        each column layout (the layers' modules share a few), not once per module."""
        key = (column_slot.data_ptr(), column_slot.numel(), dtype)
        if key not in self._keep:
            self._keep[key] = (column_slot == self.rows[:, None]).to(dtype).unsqueeze(1)
        return self._keep[key]


class MultiLoRALinear(nn.Module):
    """`base` plus a per-row low-rank update; `part_sizes` are the output sizes of the projections fused in
    `base` (one entry when it is not fused)."""

    def __init__(self, base: nn.Module, in_features: int, part_sizes: list[int], selection: _Selection):
        super().__init__()
        self.base, self.in_features, self.part_sizes, self.selection = base, in_features, list(part_sizes), selection
        self.out_features = sum(self.part_sizes)
        self.slot_weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (A (r, in), B (out, r))
        self.lora_A: torch.Tensor | None = None  # (ΣR, in): every adapter's A, stacked along the rank
        self.lora_B: torch.Tensor | None = None  # (out, ΣR)
        self.column_slot: torch.Tensor | None = None  # (ΣR,): the adapter slot each rank column belongs to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, T, out)
        rows = self.selection.rows
        if rows is None or self.lora_A is None:
            return y
        low_rank = F.linear(x, self.lora_A.to(x.dtype))  # (B, T, ΣR)
        low_rank.mul_(self.selection.keep(self.column_slot, x.dtype))  # only the row's own adapter's columns
        out = y.shape[-1]
        return torch.addmm(y.reshape(-1, out), low_rank.reshape(-1, low_rank.shape[-1]),
                           self.lora_B.to(x.dtype).t()).view(y.shape)  # (B, T, out)

    def set_slot(self, slot: int, parts: list[tuple[torch.Tensor, torch.Tensor] | None], scale: float) -> None:
        """Give adapter `slot` the (A, B) of each fused part (None: that part is not adapted)."""
        ranks = [0 if p is None else p[0].shape[0] for p in parts]
        if not any(ranks):  # this adapter leaves the projection alone
            self.clear_slot(slot)
            return
        out = sum(self.part_sizes)
        fused_a = torch.zeros(sum(ranks), self.in_features)
        fused_b = torch.zeros(out, sum(ranks))  # block-diagonal: part i's rows x part i's rank columns
        row, col = 0, 0
        for part, size, rank in zip(parts, self.part_sizes, ranks):
            if part is not None:
                fused_a[col:col + rank] = part[0].float()
                fused_b[row:row + size, col:col + rank] = part[1].float() * scale
            row, col = row + size, col + rank
        self.slot_weights[slot] = (fused_a, fused_b)
        self._restack()

    def clear_slot(self, slot: int) -> None:
        self.slot_weights.pop(slot, None)
        self._restack()

    def _restack(self) -> None:
        if not self.slot_weights:
            self.lora_A = self.lora_B = self.column_slot = None
            return
        slots = sorted(self.slot_weights)
        dtype, device = _weight_dtype(self.base), _weight_device(self.base)
        self.lora_A = torch.cat([self.slot_weights[s][0] for s in slots]).to(device, dtype)  # (ΣR, in)
        self.lora_B = torch.cat([self.slot_weights[s][1] for s in slots], dim=1).to(device, dtype)  # (out, ΣR)
        self.column_slot = torch.cat([torch.full((self.slot_weights[s][0].shape[0],), s) for s in slots]).to(device)


def _weight_dtype(module: nn.Module) -> torch.dtype:
    """The activations' dtype a base module works in (quantized layers keep integer weights)."""
    floats = [p.dtype for p in itertools.chain(module.parameters(), module.buffers()) if p.dtype.is_floating_point]
    return floats[0] if floats else torch.float32


def _weight_device(module: nn.Module) -> torch.device:
    tensors = list(itertools.chain(module.parameters(), module.buffers()))
    return tensors[0].device if tensors else torch.device("cpu")


@dataclass
class _Adapter:
    slot: int
    path: str
    namespace: int  # a number never reused, so a reloaded adapter never meets the old one's cached prefixes


# (holder attribute, fused module name, the targets it holds in order)
_FUSED = [("attention", "wqkv", ("wq", "wk", "wv")), ("attention", "wo", ("wo",)),
          ("feed_forward", "w13", ("w1", "w3")), ("feed_forward", "w2", ("w2",))]
_HOLDER = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}


class LoRASet:
    """Named LoRA adapters over one base model; `add`/`remove` must not race a forward pass (the engine
    calls them on its own thread)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.selection = _Selection()
        self.adapters: dict[str, _Adapter] = {}
        self._modules: list[tuple[MultiLoRALinear, tuple[str, ...], int]] | None = None  # (module, targets, layer)
        self._namespaces = itertools.count(1)

    # ----- wrapping the model -----
    def _sizes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of every adaptable projection, from the model's shape."""
        args = self.model.args
        q, kv, hidden = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim
        return {"wq": (args.dim, q), "wk": (args.dim, kv), "wv": (args.dim, kv), "wo": (q, args.dim),
                "w1": (args.dim, hidden), "w3": (args.dim, hidden), "w2": (hidden, args.dim)}

    def _install(self) -> None:
        """Wrap every adaptable projection, fused (`wqkv`, `w13`) or not, once."""
        if self._modules is not None:
            return
        sizes, modules = self._sizes(), []
        for i, layer in enumerate(self.model.layers):
            for holder_name, fused_name, targets in _FUSED:
                holder = getattr(layer, holder_name)
                groups = [(fused_name, targets)] if getattr(holder, fused_name, None) is not None else [(t, (t,)) for t in targets]
                for name, group in groups:
                    wrapped = MultiLoRALinear(getattr(holder, name), sizes[group[0]][0],
                                              [sizes[t][1] for t in group], self.selection)
                    setattr(holder, name, wrapped)
                    modules.append((wrapped, group, i))
        self._modules = modules

    # ----- adapters -----
    def add(self, name: str, path: str) -> None:
        """Read the PEFT folder at `path` and serve it as `name`. Raises ValueError on a bad folder, a name
        already taken, or adapters shaped for another base model."""
        from ..train.lora import read_peft_adapter

        if name in self.adapters:
            raise ValueError(f"a LoRA adapter named '{name}' is already loaded; unload it first or pick another name")
        try:
            config, pairs = read_peft_adapter(path, self.model.args)
        except OSError as exc:  # e.g. the folder has a config but no weights file
            raise ValueError(f"{path}: cannot read the adapter ({exc})") from None
        except RuntimeError as exc:  # q/k rows that cannot be regrouped into this model's heads
            raise ValueError(f"{path}: the adapter does not fit this model ({exc}); it was trained for another "
                             f"base model") from None
        sizes = self._sizes()
        for module_name, (lora_a, lora_b) in pairs.items():
            expected_in, expected_out = sizes[module_name.rsplit(".", 1)[1]]
            if lora_a.shape[1] != expected_in or lora_b.shape[0] != expected_out:
                raise ValueError(f"{path}: {module_name} adapts a ({lora_a.shape[1]} -> {lora_b.shape[0]}) projection "
                                 f"but this model's is ({expected_in} -> {expected_out}); the adapter was trained "
                                 f"for another base model")
        self._install()
        used = {a.slot for a in self.adapters.values()}
        slot = next(s for s in itertools.count(1) if s not in used)
        for module, targets, layer in self._modules:
            module.set_slot(slot, [pairs.get(f"layers.{layer}.{_HOLDER[t]}.{t}") for t in targets], config.scaling)
        self.adapters[name] = _Adapter(slot, str(path), next(self._namespaces))

    def remove(self, name: str) -> None:
        """Stop serving adapter `name` (ValueError when none has that name)."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise ValueError(f"no LoRA adapter named '{name}' is loaded")
        for module, _, _ in self._modules or []:
            module.clear_slot(adapter.slot)

    def select(self, slots: list[int] | None) -> None:
        """The adapter slot of each batch row for the next forward passes (None or all 0: the base alone)."""
        if slots is None or not any(slots) or self._modules is None:
            self.selection.set(None)
        else:
            self.selection.set(torch.tensor(slots, device=self.model.tok_embeddings.weight.device))
