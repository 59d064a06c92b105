"""The MediRound server protocol, shared by `mediround serve` and its client: version, headers, limits, and the
wire forms of slices, masks and rounds. numpy and the standard library only (it runs in Slicer's Python).

Version 1 (the paths are under /v1; the server's OpenAPI at /openapi.json documents each endpoint):
every request carries `X-MediRound-Protocol: 1` and every response answers with the server's; a mismatch is
refused by both sides. Slices travel as `.npy` bytes (float32 raw values, display orientation), masks as
base64 of `numpy.packbits` inside JSON (a 512² mask is 32 KiB) or as `.npy` bytes on the mask endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import json
import re

import numpy as np

PROTOCOL_VERSION = 1
PROTOCOL_HEADER = "X-MediRound-Protocol"
USER_HEADER = "X-MediRound-User"  # who the client is, on a server without tokens (loopback only)
VOLUME_HEADER = "X-MediRound-Volume"  # the volume fingerprint: the affinity key of a load balancer
REPLICA_HEADER = "X-MediRound-Replica"  # which server replica answered
NPY_TYPE = "application/x-npy"
DEFAULT_PORT = 8765
DEFAULT_MAX_REQUEST_BYTES = 80 * 2**20  # a 4096² float32 slice (64 MiB) and its framing
MAX_WAIT_S = 30.0  # the longest a request waits for a round before answering 202 with the queue position

FINGERPRINT_RE = re.compile(r"[0-9a-f]{8,64}")  # use fullmatch
USER_RE = re.compile(r"[A-Za-z0-9_@-][A-Za-z0-9._@-]{0,63}")  # fullmatch; no leading dot: never ".."
TOKEN_RE = re.compile(r"[!-~]+")  # printable ASCII, no spaces: what an Authorization header carries intact
VIEWS = ("axial", "coronal", "sagittal")


# -- slices -------------------------------------------------------------------------------------------------
def array_to_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_to_array(payload: bytes, max_items: int | None = None, ndim: int | None = None,
                 kinds: str = "fiub") -> np.ndarray:
    """An array from `.npy` bytes (never pickles); ValueError on anything else. The header is checked before any
    memory is allocated: `ndim` dimensions, at most `max_items` numbers of a plain numeric kind (`kinds`), and
    exactly the bytes it declares (a header may promise a 100000×100000 array in a few bytes)."""
    stream = io.BytesIO(payload)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = read_header(stream)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise ValueError(f"not a .npy array ({exc})") from None
    count = int(np.prod(shape, dtype=object))
    if dtype.hasobject or dtype.kind not in kinds or dtype.itemsize > 8:
        raise ValueError(f"a .npy array of {dtype}, not of plain numbers")
    if ndim is not None and len(shape) != ndim or max_items is not None and count > max_items:
        raise ValueError(f"a {'×'.join(map(str, shape)) or 'scalar'} array (at most {max_items} values in "
                         f"{ndim} dimensions are accepted)")
    if len(payload) - stream.tell() != count * dtype.itemsize:
        raise ValueError(f"a truncated or padded .npy array ({len(payload) - stream.tell()} bytes of data for "
                         f"{'×'.join(map(str, shape))} {dtype})")
    stream.seek(0)
    try:
        return np.load(stream, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"not a .npy array ({exc})") from None


def slice_meta(image) -> dict:
    """What a server needs besides the pixels to rebuild an `imaging.SliceImage`."""
    return {"axis": int(image.axis), "transpose": bool(image.transpose), "flip_rows": bool(image.flip_rows),
            "flip_cols": bool(image.flip_cols), "modality": str(image.modality),
            "spacing": [float(s) for s in image.spacing], "region": image.region,
            "window": None if image.window is None else [float(v) for v in image.window],
            "centre_mm": None if image.centre_mm is None else [float(v) for v in image.centre_mm]}


# -- masks and rounds -----------------------------------------------------------------------------------------
def pack_mask(mask: np.ndarray) -> dict:
    mask = np.asarray(mask, dtype=bool)
    return {"shape": list(mask.shape), "bits": base64.b64encode(np.packbits(mask.ravel())).decode("ascii")}


def unpack_mask(data: dict) -> np.ndarray:
    try:
        shape = tuple(int(n) for n in data["shape"])
        if len(shape) != 2 or min(shape) < 1 or shape[0] * shape[1] > 4096 * 4096:
            raise ValueError(f"bad mask shape {shape}")
        bits = np.frombuffer(base64.b64decode(data["bits"], validate=True), np.uint8)
        count = shape[0] * shape[1]
        if bits.size != (count + 7) // 8:
            raise ValueError(f"{bits.size} bytes do not hold a {shape[0]}×{shape[1]} mask")
        return np.unpackbits(bits, count=count).astype(bool).reshape(shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed mask ({exc})") from None


def round_digest(round_) -> str:
    """What identifies a finished round on both sides: its number, slice, words, reference and mask."""
    head = json.dumps([round_.number, round_.view, round_.slice_index, round_.query, round_.answer, round_.entity,
                       round_.reference, list(round_.mask.shape)], ensure_ascii=True)
    h = hashlib.sha256(head.encode())
    h.update(np.packbits(np.asarray(round_.mask, dtype=bool).ravel()).tobytes())
    return h.hexdigest()[:24]


def round_to_wire(round_, with_mask: bool = True) -> dict:
    data = round_.to_json()
    data["digest"] = round_digest(round_)
    if with_mask:
        data["mask"] = pack_mask(round_.mask)
    return data


def round_from_wire(data: dict):
    """A `session.Round` from its wire form (mask included); ValueError when malformed."""
    from ..session import Round, guess_fields_problem

    try:
        fields = {k: data[k] for k in ("number", "view", "slice_index", "query", "answer", "entity", "reference")}
        optional = {k: data[k] for k in ("jcm_score", "corrected", "seg_forced", "absent", "reference_guessed",
                                            "reference_alternatives", "lm_tokens", "timings") if k in data}
        round_ = Round(mask=unpack_mask(data["mask"]), **fields, **optional)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed round ({type(exc).__name__}: {exc})") from None
    if type(round_.number) is not int or round_.number < 1 or round_.view not in VIEWS:
        raise ValueError(f"malformed round (number {round_.number!r}, view {round_.view!r})")
    ref = round_.reference
    if ref is not None and (type(ref) is not int or not 1 <= ref < round_.number):
        raise ValueError(f"malformed round {round_.number}: reference {ref!r} is not an earlier round")
    problem = guess_fields_problem(round_.number, round_.reference_guessed, round_.reference_alternatives)
    if problem:
        raise ValueError(f"malformed round {round_.number}: {problem}")
    if "digest" in data and data["digest"] != round_digest(round_):
        raise ValueError(f"round {round_.number} arrived damaged (its digest does not match)")
    return round_


# -- addresses ------------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost` itself: addresses that never leave this machine (not `x.localhost`, which
    a resolver may send anywhere, nor `localhost.example.org`)."""
    host = (host or "").strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_tokens(text: str, source: str) -> dict[str, str]:
    """`user:token` lines (blank lines and # comments skipped) → {token: user}. A single bare token belongs to
    user `default`. Tokens must be at least 16 characters."""
    tokens: dict[str, str] = {}
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    for n, line in enumerate(lines, start=1):
        user, sep, token = line.partition(":")
        if not sep:
            if len(lines) > 1:
                raise ValueError(f"{source}: line {n} is not `user:token`")
            user, token = "default", line
        user, token = user.strip(), token.strip()
        if not USER_RE.fullmatch(user):
            raise ValueError(f"{source}: line {n}: user name {user!r} must be 1–64 letters, digits or ._@-")
        if len(token) < 16:
            raise ValueError(f"{source}: line {n}: the token of {user} is shorter than 16 characters")
        if not TOKEN_RE.fullmatch(token):
            raise ValueError(f"{source}: line {n}: the token of {user} holds characters other than printable ASCII "
                             f"(an HTTP header carries no others)")
        if token in tokens:
            raise ValueError(f"{source}: line {n}: the token of {user} is used twice")
        clash = [u for u in tokens.values() if u.lower() == user.lower() and u != user]
        if clash:  # they would share one sessions folder on a case-insensitive file system
            raise ValueError(f"{source}: line {n}: user names {clash[0]!r} and {user!r} differ only by case")
        tokens[token] = user
    if not tokens:
        raise ValueError(f"{source}: holds no token")
    return tokens
