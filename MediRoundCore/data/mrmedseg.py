"""The MR-MedSeg conversation format: typed read, validation and exact write-back.

A dataset file is a JSON list of conversations (a single conversation object is accepted on read):

    {"task": "segmentation", "base": ..., "conversations": [
        {"from": "human", "value": "[IMAGE256:images/x.png] <query>"},
        {"from": "gpt",   "value": "<answer text> [MASK-DECODE:masks/x_round_00.png]."},
        {"from": "human", "value": "[MASK-ENCODE:m][BOX-ENCODE:m] <query>", "ind": 0},
        {"from": "gpt",   "value": "<answer text> [REF-DECODE:m][MASK-DECODE:masks/x_round_01.png]."}]}

`ind` is the 0-based index of the earlier round (its MASK-DECODE output) that a round refers to.
REF-DECODE is kept on write and ignored on read, as in the public loader. Masks are PNGs with
foreground 255; paths are relative to the dataset folder. Reading then writing reproduces the file's
JSON exactly (key order, unknown keys and text); rounds that were edited are written canonically.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from ..errors import DatasetError

TAG_KINDS = ("IMAGE256", "MASK-ENCODE", "BOX-ENCODE", "MASK-DECODE", "REF-DECODE")
_TAG_RE = re.compile(r"\[(IMAGE256|MASK-ENCODE|BOX-ENCODE|MASK-DECODE|REF-DECODE):([^\[\]\s]+)\]")
_TAG_START_RE = re.compile(r"\[(IMAGE256|MASK-ENCODE|BOX-ENCODE|MASK-DECODE|REF-DECODE)\b")
_ANY_TAG_RE = re.compile(r"\[([A-Z][A-Z0-9_-]*[0-9A-Z]):")


@dataclass
class DialogueRound:
    """One human query and the gpt answer that segments `mask_path` (referring to round `ref_index`)."""

    query: str
    answer_text: str
    mask_path: str
    ref_index: int | None = None
    ref_mask_path: str | None = None
    raw_human: dict | None = field(default=None, repr=False, compare=False)
    raw_gpt: dict | None = field(default=None, repr=False, compare=False)


@dataclass
class Conversation:
    """A multi-round conversation on one image; `extra` keeps unknown top-level keys in order."""

    image_path: str
    rounds: list[DialogueRound]
    task: str = "segmentation"
    base: object = "[null]"
    extra: dict = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), repr=False, compare=False)


def _where(path, conv_index: int, turn: int | None = None) -> str:
    where = f"{path}: conversation {conv_index}"
    return where + (f", turn {turn}" if turn is not None else "")


def _tags(text: str, where: str) -> tuple[list[tuple[str, str]], str]:
    """The tags of a turn in order and the text with them removed; malformed tags raise DatasetError."""
    tags = [(m.group(1), m.group(2)) for m in _TAG_RE.finditer(text)]
    unknown = [k for k in _ANY_TAG_RE.findall(text) if k not in TAG_KINDS]
    if unknown:
        raise DatasetError(f"{where}: unknown tag kind {unknown[0]!r} in {text!r} (known: {', '.join(TAG_KINDS)})")
    if len(_TAG_START_RE.findall(text)) != len(tags):
        raise DatasetError(f"{where}: malformed tag in {text!r} (expected [KIND:relative/path.png])")
    return tags, _TAG_RE.sub("", text)


def parse_human(value: str, where: str, first: bool) -> tuple[str | None, str | None, str]:
    """(image path, reference mask path, query) of a human turn."""
    tags, rest = _tags(value, where)
    kinds = [k for k, _ in tags]
    if any(k in ("MASK-DECODE", "REF-DECODE") for k in kinds):
        raise DatasetError(f"{where}: a human turn may not contain MASK-DECODE or REF-DECODE tags")
    image = ref = None
    if first:
        if kinds != ["IMAGE256"]:
            raise DatasetError(f"{where}: the first human turn needs exactly one [IMAGE256:...] tag, found {kinds}")
        image = tags[0][1]
    else:
        if "IMAGE256" in kinds:
            raise DatasetError(f"{where}: IMAGE256 is only allowed in the first human turn")
        if kinds:
            paths = {p for _, p in tags}
            if sorted(kinds) != ["BOX-ENCODE", "MASK-ENCODE"] or len(paths) != 1:
                raise DatasetError(f"{where}: a referring turn needs [MASK-ENCODE:m][BOX-ENCODE:m] with the same "
                                   f"mask, found {tags}")
            ref = tags[0][1]
    query = rest.strip()
    if not query:
        raise DatasetError(f"{where}: empty query")
    return image, ref, query


def parse_gpt(value: str, where: str) -> tuple[str, str, str | None]:
    """(answer text, mask path, REF-DECODE path or None) of a gpt turn."""
    tags, _ = _tags(value, where)
    kinds = [k for k, _ in tags]
    if kinds not in (["MASK-DECODE"], ["REF-DECODE", "MASK-DECODE"]):
        raise DatasetError(f"{where}: a gpt turn needs [MASK-DECODE:...] (optionally after [REF-DECODE:...]), "
                           f"found {kinds or 'no tags'}")
    first = _TAG_RE.search(value)
    last = list(_TAG_RE.finditer(value))[-1]
    between = value[first.end():last.start()] if len(tags) == 2 else ""
    suffix = value[last.end():]
    if between.strip() or suffix.strip() not in ("", "."):
        raise DatasetError(f"{where}: unexpected text between or after the decode tags in {value!r}")
    answer = value[:first.start()].strip()
    ref = tags[0][1] if len(tags) == 2 else None
    return answer, tags[-1][1], ref


def compose_human(rnd: DialogueRound, image_path: str | None) -> str:
    if image_path is not None:
        return f"[IMAGE256:{image_path}] {rnd.query}"
    if rnd.ref_mask_path is None:
        return rnd.query
    return f"[MASK-ENCODE:{rnd.ref_mask_path}][BOX-ENCODE:{rnd.ref_mask_path}] {rnd.query}"


def compose_gpt(rnd: DialogueRound) -> str:
    ref = f"[REF-DECODE:{rnd.ref_mask_path}]" if rnd.ref_mask_path is not None else ""
    prefix = f"{rnd.answer_text} " if rnd.answer_text else ""
    return f"{prefix}{ref}[MASK-DECODE:{rnd.mask_path}]."


def _conversation_from_json(obj, path, ci: int) -> Conversation:
    if not isinstance(obj, dict):
        raise DatasetError(f"{_where(path, ci)}: expected an object, found {type(obj).__name__}")
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{_where(path, ci)}: 'conversations' must be a non-empty list")
    if obj.get("task", "segmentation") != "segmentation":
        raise DatasetError(f"{_where(path, ci)}: task {obj.get('task')!r} is not 'segmentation'")
    if len(turns) % 2:
        raise DatasetError(f"{_where(path, ci)}: {len(turns)} turns; human and gpt turns must come in pairs")
    rounds: list[DialogueRound] = []
    image_path = None
    for k in range(0, len(turns), 2):
        human, gpt = turns[k], turns[k + 1]
        for t, (turn, role) in enumerate(((human, "human"), (gpt, "gpt"))):
            if not isinstance(turn, dict) or turn.get("from") != role or not isinstance(turn.get("value"), str):
                raise DatasetError(f"{_where(path, ci, k + t)}: expected a {role!r} turn with a text 'value'")
        r = k // 2
        img, ref_path, query = parse_human(human["value"], _where(path, ci, k), first=(r == 0))
        if r == 0:
            image_path = img
        answer, mask, _ref_decode = parse_gpt(gpt["value"], _where(path, ci, k + 1))
        ind = human.get("ind")
        if r == 0 and ind is not None:
            raise DatasetError(f"{_where(path, ci, k)}: the first round cannot refer to an earlier round (ind={ind})")
        if r > 0:
            if ind is None and ref_path is not None:
                raise DatasetError(f"{_where(path, ci, k)}: MASK-ENCODE without 'ind'")
            if ind is not None:
                if not isinstance(ind, int) or isinstance(ind, bool):
                    raise DatasetError(f"{_where(path, ci, k)}: 'ind' must be an integer, found {ind!r}")
                if not 0 <= ind < r:
                    raise DatasetError(f"{_where(path, ci, k)}: 'ind' {ind} must point to an earlier round "
                                       f"(0..{r - 1}) of round {r}")
                if ref_path is None:
                    raise DatasetError(f"{_where(path, ci, k)}: 'ind' {ind} without [MASK-ENCODE:...][BOX-ENCODE:...]")
                if ref_path != rounds[ind].mask_path:
                    raise DatasetError(f"{_where(path, ci, k)}: MASK-ENCODE {ref_path!r} is not the mask of round "
                                       f"{ind} ({rounds[ind].mask_path!r})")
        rounds.append(DialogueRound(query, answer, mask, ind if r > 0 else None, ref_path,
                                    raw_human=human, raw_gpt=gpt))
    extra = {key: val for key, val in obj.items() if key not in ("task", "base", "conversations")}
    return Conversation(image_path, rounds, obj.get("task", "segmentation"), obj.get("base", "[null]"), extra,
                        key_order=tuple(obj.keys()))


def check_files(conv: Conversation, root: Path, path, ci: int) -> None:
    """Every image and mask exists, masks are single-channel and the size of the image."""
    img_file = root / conv.image_path
    if not img_file.is_file():
        raise DatasetError(f"{_where(path, ci, 0)}: image file {conv.image_path!r} not found under {root}")
    with Image.open(img_file) as im:
        size = im.size
    for r, rnd in enumerate(conv.rounds):
        mfile = root / rnd.mask_path
        if not mfile.is_file():
            raise DatasetError(f"{_where(path, ci, 2 * r + 1)}: mask file {rnd.mask_path!r} not found under {root}")
        with Image.open(mfile) as m:
            if m.size != size:
                raise DatasetError(f"{_where(path, ci, 2 * r + 1)}: mask {rnd.mask_path!r} is {m.size[0]}x{m.size[1]}"
                                   f" but image {conv.image_path!r} is {size[0]}x{size[1]}")


def read_conversations(json_path, root=None, *, check=True) -> list[Conversation]:
    """Conversations of a dataset file; `root` (default: the file's folder) resolves image/mask paths.

    With `check`, files are checked too (existence, mask size == image size). Raises DatasetError.
    """
    json_path = Path(json_path)
    root = Path(root) if root is not None else json_path.parent
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{json_path}: dataset file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{json_path}: not valid JSON ({exc})") from None
    items = data if isinstance(data, list) else [data]
    convs = [_conversation_from_json(obj, json_path, ci) for ci, obj in enumerate(items)]
    if check:
        for ci, conv in enumerate(convs):
            check_files(conv, root, json_path, ci)
    return convs


def _with_unknown_keys(canonical: dict, raw: dict | None) -> dict:
    """A canonical turn plus the keys of the raw turn that the format does not define."""
    if raw is not None:
        canonical.update({k: v for k, v in raw.items() if k not in ("from", "value", "ind")})
    return canonical


def _same_round(rnd: DialogueRound, raw_human: dict, raw_gpt: dict, first: bool) -> bool:
    try:
        img, ref, query = parse_human(raw_human["value"], "", first)
        answer, mask, _ = parse_gpt(raw_gpt["value"], "")
    except (DatasetError, KeyError, TypeError):
        return False
    ind = raw_human.get("ind")
    return (query, answer, mask, ref) == (rnd.query, rnd.answer_text, rnd.mask_path, rnd.ref_mask_path) and \
        (ind if not first else None) == rnd.ref_index


def conversation_to_json(conv: Conversation) -> dict:
    """The JSON object of a conversation: unchanged rounds verbatim, changed ones canonical."""
    turns = []
    for r, rnd in enumerate(conv.rounds):
        first = r == 0
        if rnd.raw_human is not None and rnd.raw_gpt is not None and _same_round(rnd, rnd.raw_human, rnd.raw_gpt, first) \
                and (not first or parse_human(rnd.raw_human["value"], "", True)[0] == conv.image_path):
            turns += [rnd.raw_human, rnd.raw_gpt]
            continue
        if not first and rnd.ref_index is not None and rnd.ref_mask_path is None:
            rnd = replace(rnd, ref_mask_path=conv.rounds[rnd.ref_index].mask_path)
        human = {"from": "human", "value": compose_human(rnd, conv.image_path if first else None)}
        if not first and rnd.ref_index is not None:
            human["ind"] = rnd.ref_index
        turns += [_with_unknown_keys(human, rnd.raw_human),
                  _with_unknown_keys({"from": "gpt", "value": compose_gpt(rnd)}, rnd.raw_gpt)]
    fields = {"task": conv.task, "base": conv.base, "conversations": turns, **conv.extra}
    order = [k for k in conv.key_order if k in fields] + [k for k in fields if k not in conv.key_order]
    return {k: fields[k] for k in order}


def write_conversations(conversations: list[Conversation], json_path, *, single: bool = False) -> Path:
    """Write a dataset file (a JSON list; `single=True` writes one conversation as a bare object)."""
    json_path = Path(json_path)
    items = [conversation_to_json(c) for c in conversations]
    if single:
        if len(items) != 1:
            raise DatasetError(f"{json_path}: single=True needs exactly one conversation, got {len(items)}")
        data = items[0]
    else:
        data = items
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(json_path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(json_path)
    return json_path


def new_round(query: str, answer_text: str, mask_path: str, ref_index: int | None = None,
              ref_mask_path: str | None = None) -> DialogueRound:
    """A round without raw turns (written canonically)."""
    return DialogueRound(query, answer_text, mask_path, ref_index, ref_mask_path)


__all__ = ["Conversation", "DialogueRound", "read_conversations", "write_conversations", "conversation_to_json",
           "check_files", "new_round", "TAG_KINDS"]
