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

The bound is checked once per weight version against the float32 head on probe states (random, and the head's
own rows); a torch without `_int_mm` on the CPU, or a check that fails, keeps the plain float32 head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_HEAD_BYTES = 8 << 20  # a smaller head is read quickly enough in float32 (MediRound-Tiny's: 1.3 MB)
MAX_CANDIDATES = 1024  # rows to rescore exactly (1.5 kB each at h=384); beyond, the whole float32 head
REL = 2.0 ** -20  # two float32 products scale the exact int32 sum (2^-24 each), with room
PROBES = 64  # probe states per check


class ScreenedArgmax:
    """`screen(hidden (n,h) float32) -> LongTensor (n,)`: the argmax of `head(hidden)` per row."""

    def __init__(self, head: torch.nn.Linear):
        self.head = head
        self._signature: tuple | None = None
        self._tables: tuple | None = None
        self.usable = True  # False where the probe check failed on this machine (then: the float32 head)
        self.rescored = 0  # rows rescored in float32 over this screen's life (how sharp the screen is)
        self.fallbacks = 0  # rows that read the whole float32 head

    @classmethod
    def for_head(cls, head) -> "ScreenedArgmax | None":
        """A screen for a bias-free float32 CPU head of at least MIN_HEAD_BYTES, else None (use the head)."""
        weight = getattr(head, "weight", None)
        if (type(head) is not torch.nn.Linear or head.bias is not None or weight is None
                or weight.dtype != torch.float32 or weight.device.type != "cpu"
                or weight.numel() * weight.element_size() < MIN_HEAD_BYTES):
            return None
        return cls(head)

    def _current(self) -> tuple | None:
        w = self.head.weight
        signature = (id(w), w.data_ptr(), w.device, w.dtype, w._version, tuple(w.shape))
        if signature != self._signature:
            self._signature, self._tables = signature, None
            if w.dtype == torch.float32 and w.device.type == "cpu":
                with torch.inference_mode():
                    w32 = w.detach()
                    scale, q = _quantise_rows(w32)
                    w_hat = q.float() * scale[:, None]
                    acc = 2.0 * w32.shape[1] * 2.0 ** -24  # float32 summation over the hidden size, ×2
                    self._tables = (q.t(), scale, (w32 - w_hat).norm(dim=1) + acc * w32.norm(dim=1),
                                    w_hat.norm(dim=1))
                    try:
                        self.usable = self._bound_holds(w32)
                    except RuntimeError:  # no int8 matrix product on this CPU build
                        self.usable = False
        return self._tables if self.usable else None

    def _bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Screened logits (n,V) and their bounds (n,V) for float32 states x (n,h)."""
        q_t, w_scale, w_side, w_hat_norm = self._tables
        x_scale, x_q = _quantise_rows(x)
        y = torch._int_mm(x_q, q_t).float() * x_scale[:, None] * w_scale
        x_side = (x - x_q.float() * x_scale[:, None]).norm(dim=1, keepdim=True)
        bound = x.norm(dim=1, keepdim=True) * w_side + x_side * w_hat_norm + REL * y.abs()
        return y, bound

    def _bound_holds(self, w32: torch.Tensor) -> bool:
        """The bound against the float32 head on probe states: random ones at the scales a final RMSNorm
        gives, and the head's own rows (the largest logits it can produce)."""
        g = torch.Generator().manual_seed(0)
        h = w32.shape[1]
        rows = w32[torch.randint(0, w32.shape[0], (PROBES // 2,), generator=g)]
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12) * h ** 0.5
        scales = torch.logspace(-1, 2, PROBES // 2)[:, None]
        probes = torch.cat([torch.randn(PROBES // 2, h, generator=g) * scales, rows * scales])
        y, bound = self._bounds(probes)
        return bool(((probes @ w32.T - y).abs() <= bound).all())

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        weight = self.head.weight
        if x.dtype != torch.float32 or self._current() is None:
            return F.linear(x.to(weight.dtype), weight).argmax(-1)
        y, bound = self._bounds(x)
        best_low = (y - bound).amax(dim=1, keepdim=True)
        possible = (y + bound) >= best_low
        counts = possible.sum(dim=1)
        tokens = torch.empty(x.shape[0], dtype=torch.long)
        for i in range(x.shape[0]):
            if int(counts[i]) > MAX_CANDIDATES:
                self.fallbacks += 1
                tokens[i] = F.linear(x[i:i + 1], weight)[0].argmax()
                continue
            rows = possible[i].nonzero()[:, 0]  # ascending: argmax's first maximum is the lowest index
            self.rescored += rows.numel()
            tokens[i] = rows[(weight.index_select(0, rows) @ x[i]).argmax()]
        return tokens


def _quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (scales (n,), int8 (n,h)) with x ≈ int8 · scale."""
    scale = x.abs().amax(dim=1).clamp_min(1e-30) / 127.0
    return scale, torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
