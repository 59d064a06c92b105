"""The greedy next token over a large language-model head, exactly, from an int8 screen of it.

Greedy decoding reads only the argmax of the head's logits. Lite's head (tied to MiniLM's 30.5 k word
embeddings) is 47 MB of float32: on a 2-core CPU, reading it once per decoding step cost more than the four
layers before it (3–10 ms a forward). `ScreenedArgmax` keeps an int8 copy of the head (one scale per row, a
quarter of the bytes; `torch._int_mm`, exact int32 sums: 0.1–0.4 ms) and a bound on how far each screened
logit can be from the float32 one. With x the final hidden state quantised per row to x̂ (int8, one scale), w
a head row and ŵ its int8 copy:

    |x·w - x̂·ŵ| ≤ ‖x‖·‖w - ŵ‖ + ‖x - x̂‖·‖ŵ‖            (Cauchy–Schwarz)

plus ACC·‖x‖·‖w‖ for float32's own summation in the logit it stands in for, and REL·|y| for the two float32
products that scale the exact int32 sum into y. Only rows whose upper bound reaches the best lower bound can
be the argmax; their float32 logits are computed exactly and the best of them, lowest index on a tie as
`torch.argmax`, is the token. More than `MAX_CANDIDATES` such rows (a near-flat distribution) fall back to the
whole float32 head, so the choice is always float32 greedy decoding's, up to the summation order of one dot
product.

Norms are taken of the quantised-scale values (x / scale, within ±127) and scaled back, so tiny states do not
underflow the bound to zero; a state whose norm is not finite (NaN, inf, overflow) reads the whole head, as
does a state with no candidate.

The tables are rebuilt when the head's weight is replaced, moved, cast or changed in place through autograd-
visible operations (identity, address, device, dtype and version counter; the screen holds the tensor it was
built from, so a new one cannot reuse its address). A change through `.data` is invisible to it, as to every
such cache: call `DecodeStep.clear()` (`Engine.forget()`) after one. Each build checks, on probe states, that
`torch._int_mm` is exact against a float64 product and that the bound holds for every row, including states
aimed at each rounding term; a torch without `_int_mm` on the CPU, or a failed check, keeps the float32 head.

The rescored logits are float32 dot products of one state with each candidate row: bitwise the float32 head's
for one state; for several states at once (an answer draft) the head's batched product may sum in another
order, so a near-tie within a few float32 ulps could go the other way.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

MIN_HEAD_BYTES = 8 << 20  # a smaller head is read quickly enough in float32 (MediRound-Tiny's: 1.3 MB)
MAX_CANDIDATES = 1024  # rows to rescore exactly (1.5 kB each at h=384); beyond, the whole float32 head
REL = 2.0 ** -20  # two float32 products scale the exact int32 sum (2^-24 each), with room
PROBES = 64  # probe states per check


class ScreenedArgmax:
    """`screen(hidden (n,h) float32) -> LongTensor (n,)`: the argmax of `head(hidden)` per row."""

    def __init__(self, head: torch.nn.Linear):
        self._head = weakref.ref(head)  # weak: the registry of screens is keyed by the head
        self._signature: tuple | None = None
        self._source: torch.Tensor | None = None  # the weight the tables were built from (keeps its address)
        self._tables: tuple | None = None
        self.usable = True  # False where the probe check failed on this machine (then: the float32 head)
        self.rescored = 0  # rows rescored in float32 over this screen's life (how sharp the screen is)
        self.fallbacks = 0  # rows that read the whole float32 head

    @property
    def head(self) -> torch.nn.Linear:
        return self._head()

    @staticmethod
    def screenable(head) -> bool:
        """A bias-free float32 CPU head of at least MIN_HEAD_BYTES."""
        weight = getattr(head, "weight", None)
        return (type(head) is torch.nn.Linear and head.bias is None and weight is not None
                and weight.dtype == torch.float32 and weight.device.type == "cpu"
                and weight.numel() * weight.element_size() >= MIN_HEAD_BYTES)

    @classmethod
    def for_head(cls, head) -> "ScreenedArgmax | None":
        """The screen of `head` (one per head module, shared by every engine on the model), or None where the
        head is not screenable (then use the head)."""
        if not cls.screenable(head):
            return None
        screen = _SCREENS.get(head)
        if screen is None:
            screen = _SCREENS[head] = cls(head)
        return screen

    def clear(self) -> None:
        """Forget the tables (rebuilt at the next use)."""
        self._signature = self._source = self._tables = None
        self.usable = True

    def prepare(self) -> bool:
        """Build the tables now (else at the first use); True where the screen is in use."""
        with torch.inference_mode():
            return self._current() is not None

    def _current(self) -> tuple | None:
        w = self.head.weight
        signature = (id(w), w.data_ptr(), w.device, w.dtype, w._version, tuple(w.shape))
        if signature != self._signature:
            self._signature, self._source, self._tables = signature, w, None
            if w.dtype == torch.float32 and w.device.type == "cpu":
                w32 = w.detach()
                scale, q, scaled = _quantise_rows(w32)
                acc = 2.0 * w32.shape[1] * 2.0 ** -24  # float32 summation over the hidden size, ×2
                norm = scaled.norm(dim=1) * scale
                self._tables = (q.t(), scale, (scaled - q.float()).norm(dim=1) * scale + acc * norm,
                                q.float().norm(dim=1) * scale)
                try:
                    self.usable = self._check(w32, q)
                except RuntimeError:  # no int8 matrix product on this CPU build
                    self.usable = False
        return self._tables if self.usable else None

    def _bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Screened logits (n,V), their bounds (n,V), and which states the bound covers (n,): finite norms."""
        q_t, w_scale, w_side, w_hat_norm = self._tables
        x_scale, x_q, x_scaled = _quantise_rows(x)
        y = torch._int_mm(x_q, q_t).float() * x_scale[:, None] * w_scale
        x_norm = (x_scaled.norm(dim=1) * x_scale)[:, None]
        x_side = ((x_scaled - x_q.float()).norm(dim=1) * x_scale)[:, None]
        bound = x_norm * w_side + x_side * w_hat_norm + REL * y.abs()
        return y, bound, torch.isfinite(x_norm[:, 0]) & torch.isfinite(x_side[:, 0])

    def _check(self, w32: torch.Tensor, q: torch.Tensor) -> bool:
        """On probe states: `_int_mm` exact, and the bound holding for every row. The probes: random states at
        the scales a final RMSNorm gives, the head's own rows, states along rows' rounding errors (the weight
        term tight) and states whose own rounding leans on a row (the state term tight)."""
        g = torch.Generator().manual_seed(0)
        n, h = PROBES // 4, w32.shape[1]
        picked = torch.randint(0, w32.shape[0], (n,), generator=g)
        rows = w32[picked]
        unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
        rounding = rows - q[picked].float() * _quantise_rows(rows)[0][:, None]
        rounding = rounding / rounding.norm(dim=1, keepdim=True).clamp_min(1e-30)
        leaning = torch.zeros(n, h)
        leaning[:, 0] = 127.0
        leaning += 0.49 * torch.sign(q[picked].float())  # each element a hair under half a step off the grid
        scales = torch.logspace(-1, 2, n)[:, None]
        probes = torch.cat([torch.randn(n, h, generator=g) * scales, unit * h ** 0.5 * scales,
                            rounding * h ** 0.5 * scales, leaning * scales / 127.0])
        x_scale, x_q, _ = _quantise_rows(probes)
        exact_ints = (x_q.double() @ q.double().T)
        if not torch.equal(torch._int_mm(x_q, q.t()).double(), exact_ints):
            return False
        y, bound, covered = self._bounds(probes)
        return bool(covered.all() and ((probes.double() @ w32.double().T - y.double()).abs() <= bound).all())

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        weight = self.head.weight
        if x.dtype != torch.float32 or self._current() is None:
            return F.linear(x.to(weight.dtype), weight).argmax(-1)
        y, bound, covered = self._bounds(x)
        best_low = (y - bound).amax(dim=1, keepdim=True)
        possible = (y + bound) >= best_low
        counts = possible.sum(dim=1)
        tokens = torch.empty(x.shape[0], dtype=torch.long)
        whole = [i for i in range(x.shape[0])
                 if not (covered[i] and 0 < int(counts[i]) <= MAX_CANDIDATES)]  # NaN, overflow, flat
        for i in range(x.shape[0]):
            if i in whole:
                continue
            rows = possible[i].nonzero()[:, 0]  # ascending: argmax's first maximum is the lowest index
            self.rescored += rows.numel()
            tokens[i] = rows[(weight.index_select(0, rows) @ x[i]).argmax()]
        if whole:
            self.fallbacks += len(whole)
            tokens[whole] = F.linear(x[whole], weight).argmax(-1)
        return tokens


_SCREENS: "weakref.WeakKeyDictionary[torch.nn.Module, ScreenedArgmax]" = weakref.WeakKeyDictionary()


def _quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (scales (n,), int8 (n,h), x / scale (n,h)) with x ≈ int8 · scale."""
    scale = x.abs().amax(dim=1).clamp_min(1e-30) / 127.0
    scaled = x / scale[:, None]
    return scale, torch.round(scaled).clamp_(-127, 127).to(torch.int8), scaled
