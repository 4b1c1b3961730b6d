"""Concept inspection of one text (tools/inspect_concepts.py): per token, the student's top predicted concepts beside
the teacher's attribution labels, as a terminal table and as a self-contained HTML page.

    rows = inspection_rows(token_ids, token_texts, concept_logits, top=5, labels=labels)
    print(format_table(rows, descriptions))
    page = render_html(rows, descriptions, title, notes)

- Student: the concept layer's logits z [t, C] (docs/design.md §4); a token's top N ids and logits are
  torch.topk(z, N), its confidence the softmax probability of its top concept over all C concepts.
- Teacher: `teacher_labels` labels the same token ids with `attribution_labels`, the function training and
  tools/extract_concepts.py use (docs/design.md §3), after the checks training makes (the teacher reads the
  student's ids, the SAE reads the teacher's layer and has the student's C latents).
- A predicted concept "agrees" when it is also one of the token's teacher labels.
- Latent descriptions (`load_latent_descriptions`, e.g. exported from an SAE explorer such as Neuronpedia) replace
  ids by words; the id stays beside them.
"""

from __future__ import annotations

import csv
import gzip
import html
import io
import json
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import torch

NO_LABEL = -1


@dataclass
class TokenConcepts:
    """One token of the text: its predicted concepts (best first) and the teacher's labels (None: no teacher)."""

    position: int
    token_id: int
    text: str
    concept_ids: List[int]
    concept_logits: List[float]
    concept_probs: List[float]  # softmax over all C concepts
    labels: Optional[List[int]] = None  # best first, NO_LABEL = none

    @property
    def confidence(self) -> float:
        """Softmax probability of the top predicted concept (the HTML colour)."""
        return self.concept_probs[0]

    def agreeing(self) -> set:
        """Concepts both predicted (top N) and labelled by the teacher."""
        return set(self.concept_ids) & set(self.labels or ()) - {NO_LABEL}


def inspection_rows(token_ids: Sequence[int], token_texts: Sequence[str], concept_logits: torch.Tensor, top: int,
                    labels: Optional[torch.Tensor] = None) -> List[TokenConcepts]:
    """concept_logits [t, C], labels [t, K] (or None) -> one TokenConcepts per token."""
    t, num_concepts = concept_logits.shape
    if not 1 <= top <= num_concepts:
        raise ValueError(f"--top {top}: the model has {num_concepts} concepts (1 <= N <= {num_concepts})")
    if len(token_ids) != t or len(token_texts) != t or (labels is not None and labels.shape[0] != t):
        raise ValueError(f"{len(token_ids)} tokens but concept logits for {t}")
    logits = concept_logits.detach().float().cpu()
    values, ids = logits.topk(top, dim=-1)
    probs = torch.softmax(logits, dim=-1).gather(-1, ids)
    return [TokenConcepts(position=i, token_id=int(token_ids[i]), text=token_texts[i], concept_ids=ids[i].tolist(),
                          concept_logits=values[i].tolist(), concept_probs=probs[i].tolist(),
                          labels=None if labels is None else [int(x) for x in labels[i].tolist()])
            for i in range(t)]


def token_pieces(tokenizer, token_ids: Sequence[int]) -> List[str]:
    """Each token's share of the decoded text, so that the pieces join to decode(token_ids): the spaces a
    tokenizer puts between tokens (word-level vocabularies) go to the token after them, and a character split over
    byte tokens goes to the token that completes it (the others get ""). Where a prefix's decoding is no prefix of
    the next one, the token is decoded alone."""
    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces, emitted = [], ""
    for i in range(len(token_ids)):
        upto = decode(token_ids[: i + 1])
        if upto.endswith("\ufffd") and i + 1 < len(token_ids):  # an unfinished character: wait for its last byte
            pieces.append("")
            continue
        pieces.append(upto[len(emitted):] if upto.startswith(emitted) else decode(token_ids[i: i + 1]))
        emitted = upto
    return pieces


# -------------------------------------------------------------------------------------------------- teacher
def tokenizer_ids_are_text(tokenizer) -> bool:
    """True for an export of a NullTokenizer run: every token is its own decimal id, so the ids are the data and
    there is no text encoding to compare with a teacher's (training checks such a student by size only)."""
    size = len(tokenizer)
    return tokenizer.convert_ids_to_tokens(list(range(size))) == [str(i) for i in range(size)]


def teacher_labels(token_ids: torch.Tensor, tokenizer, teacher_model: str, teacher_layer: int, sae_path: str,
                   num_concepts: int, num_labels: int = 4, attribution: str = "act", masking: str = "ignore",
                   teacher_dtype: Optional[str] = None, check_tokenizer: bool = True) -> torch.Tensor:
    """Attribution labels [t, num_labels] (-1 = none) of token ids [t] (the student's tokenisation of the text),
    with the teacher and SAE flags of training (--teacher-model, --teacher-layer, --sae, --concept-num-labels,
    --concept-attribution, --concept-label-masking, --teacher-dtype) and training's checks.

    `tokenizer` is the student's (Hugging Face) tokenizer; `check_tokenizer=False` compares vocabulary sizes only
    (extract_concepts' --no-tokenizer-check)."""
    from megatron_cocomix.concepts.labeling import AttributionLabeler, check_teacher_reads_student_ids
    from megatron_cocomix.concepts.sae import check_sae_compatible

    for flag, path in (("--teacher-model", teacher_model), ("--sae", sae_path)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    labeler = AttributionLabeler(teacher_model, teacher_layer, sae_path, num_labels, attribution, masking,
                                 teacher_dtype)
    teacher = labeler.teacher
    check_sae_compatible(labeler.sae, num_latents=num_concepts, where="the student's concept head")
    by_size_only = not check_tokenizer or tokenizer_ids_are_text(tokenizer)
    run = SimpleNamespace(teacher_model=teacher_model,
                          tokenizer_type="NullTokenizer" if by_size_only else "HuggingFaceTokenizer")
    try:
        check_teacher_reads_student_ids(run, tokenizer, teacher.vocab_size)
    except OSError as e:  # a teacher directory without tokenizer files
        raise ValueError(f"--teacher-model {teacher_model}: cannot read its tokenizer to compare it with the "
                         f"student's ({type(e).__name__}); --no-tokenizer-check compares vocabulary sizes only"
                         ) from None
    t = token_ids.shape[-1]
    positions = getattr(teacher.model.config, "max_position_embeddings", None)
    if t < 2:
        raise ValueError(f"--text has {t} token(s): teacher labels need at least 2 (a next-token loss)")
    if positions is not None and t > positions:
        raise ValueError(f"--text has {t} tokens but teacher {teacher_model} takes at most {positions}")
    return labeler(token_ids.reshape(1, t))[0].cpu()


# ------------------------------------------------------------------------------------------- descriptions
_ID_KEYS = ("index", "id")
_TEXT_KEYS = ("description", "explanation")


def _latent_id(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: latent id {value!r} is not an integer")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{where}: latent id {value!r} is not an integer") from None


def _first(item: dict, keys: Sequence[str]):
    return next((item[key] for key in keys if key in item), None)


def _from_objects(items, where: str) -> Dict[int, str]:
    out: Dict[int, str] = {}
    for number, item in enumerate(items, 1):
        latent = _first(item, _ID_KEYS) if isinstance(item, dict) else None
        text = _first(item, _TEXT_KEYS) if isinstance(item, dict) else None
        if latent is None or not isinstance(text, str):
            raise ValueError(f"{where}: entry {number} is not an object with \"index\" (or \"id\") and a string "
                             f"\"description\" (or \"explanation\")")
        out.setdefault(_latent_id(latent, f"{where}: entry {number}"), text)
    return out


def _parse_descriptions(content: str, kind: str, where: str) -> Dict[int, str]:
    if kind == ".csv":
        reader = csv.DictReader(io.StringIO(content))
        columns = {name.strip().lower(): name for name in reader.fieldnames or ()}
        id_column = next((columns[key] for key in _ID_KEYS if key in columns), None)
        text_column = next((columns[key] for key in _TEXT_KEYS if key in columns), None)
        if id_column is None or text_column is None:
            raise ValueError(f"{where}: expected a header with an id (or index) and a description (or explanation) "
                             f"column, found {', '.join(reader.fieldnames or ()) or 'no header'}")
        out: Dict[int, str] = {}
        for row in reader:
            out.setdefault(_latent_id(row[id_column], f"{where}: line {reader.line_num}"), row[text_column] or "")
        return out
    try:
        if kind == ".jsonl":
            data = [json.loads(line) for line in content.splitlines() if line.strip()]
        else:
            data = json.loads(content)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        if not all(isinstance(text, str) for text in data.values()):
            raise ValueError(f"{where}: expected {{\"id\": \"description\"}} with string descriptions")
        return {_latent_id(key, where): text for key, text in data.items()}
    if isinstance(data, list):
        return _from_objects(data, where)
    raise ValueError(f"{where}: expected {{\"id\": \"description\"}} or a list of objects with index and description")


def load_latent_descriptions(path: str, num_latents: Optional[int] = None,
                             flag: str = "--latent-descriptions") -> Dict[int, str]:
    """{latent id: description} from
    - `.json`: {"id": "text"}, or a list of objects with "index" (or "id") and "description" (or "explanation"), as
      SAE explorers such as Neuronpedia export explanations;
    - `.jsonl`: one such object per line;
    - `.csv`: a header with an id (or index) column and a description (or explanation) column;
    each optionally gzipped (`.gz`). An id described more than once keeps its first description. Ids must be
    integers in [0, num_latents)."""
    where = f"{flag} {path}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no such file")
    kind = os.path.splitext(path[:-3] if path.endswith(".gz") else path)[1]
    kind = kind.lower()
    if kind not in (".json", ".jsonl", ".csv"):
        raise ValueError(f"{where}: expected a .json, .jsonl or .csv file (optionally .gz)")
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            content = f.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: unreadable ({type(e).__name__}: {e})") from None
    descriptions = _parse_descriptions(content, kind, where)
    if not descriptions:
        raise ValueError(f"{where}: holds no descriptions")
    if num_latents is not None:
        outside = sorted(i for i in descriptions if not 0 <= i < num_latents)
        if outside:
            raise ValueError(f"{where}: latent {outside[0]} is outside the model's concepts 0..{num_latents - 1} "
                             f"(descriptions of another SAE?)")
    return descriptions


# ------------------------------------------------------------------------------------------------- terminal
_TERMINAL_TOKEN_CHARS = 24
_TERMINAL_DESCRIPTION_CHARS = 32


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown_token(text: str) -> str:
    """A token as the terminal shows it: quoted, with whitespace and control characters escaped."""
    return _clip(json.dumps(text, ensure_ascii=False), _TERMINAL_TOKEN_CHARS)


def concept_name(concept: int, descriptions: Optional[Dict[int, str]]) -> str:
    """`description [id]` (whitespace collapsed, clipped) when described, else the id."""
    text = (descriptions or {}).get(concept)
    if text is None or not text.strip():
        return str(concept)
    return f"{_clip(' '.join(text.split()), _TERMINAL_DESCRIPTION_CHARS)} [{concept}]"


def format_table(rows: Sequence[TokenConcepts], descriptions: Optional[Dict[int, str]] = None,
                 teacher: Optional[str] = None) -> str:
    """The terminal table: pos | token | top predicted concepts (logit) [| teacher labels]; `*` marks a concept
    both predicted and labelled; entries are separated by two spaces (descriptions never hold two in a row)."""
    with_labels = any(row.labels is not None for row in rows)
    top = len(rows[0].concept_ids) if rows else 0
    header = ["pos", "token", f"top {top} predicted concepts (logit)"]
    if with_labels:
        header.append(f"teacher labels ({teacher or 'attribution'}, best first)")
    lines = []
    for row in rows:
        agree = row.agreeing()
        predicted = "  ".join(f"{'*' if c in agree else ''}{concept_name(c, descriptions)} {v:.3f}"
                              for c, v in zip(row.concept_ids, row.concept_logits))
        cells = [str(row.position), shown_token(row.text), predicted]
        if with_labels:
            labelled = [c for c in row.labels or () if c != NO_LABEL]
            cells.append("  ".join(f"{'*' if c in agree else ''}{concept_name(c, descriptions)}" for c in labelled)
                         or "-")
        lines.append(cells)
    widths = [max(len(cells[i]) for cells in lines + [header]) for i in range(len(header))]

    def join(cells):
        padded = [cells[0].rjust(widths[0])] + [c.ljust(w) for c, w in zip(cells[1:], widths[1:])]
        return " | ".join(padded).rstrip()

    out = [join(header), "-+-".join("-" * w for w in widths)] + [join(cells) for cells in lines]
    if with_labels:
        labelled = [row for row in rows if any(c != NO_LABEL for c in row.labels or ())]
        hits = sum(1 for row in labelled if row.agreeing())
        out.append(f"* = predicted and labelled; tokens with a teacher label among their top {top}: "
                   f"{hits} of {len(labelled)} labelled")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------- HTML
# Everything the page needs is inline: no script, no font, image or stylesheet from elsewhere. Hovering a token
# shows its concepts through CSS alone (:hover); the table at the end serves where there is no hover (touch,
# print).
_COLOUR = "255, 127, 14"
_STYLE = f"""
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 60em; }}
.meta {{ color: #555; font-size: 13px; }}
.legend {{ font-size: 13px; margin: 1em 0; }}
.scale {{ display: inline-block; width: 10em; height: 1em; vertical-align: middle; border: 1px solid #bbb;
  background: linear-gradient(to right, rgba({_COLOUR}, 0), rgba({_COLOUR}, 1)); }}
.text {{ font-family: monospace; font-size: 16px; line-height: 2.4; white-space: pre-wrap; }}
.tok {{ position: relative; border-radius: 2px; }}
.tok.agree {{ border-bottom: 3px solid #1a7f37; }}
.tok.part {{ padding: 0 0.2em; border-left: 1px dotted #999; }}
.tip {{ display: none; position: absolute; left: 0; top: 1.8em; z-index: 10; width: max-content; max-width: 36em;
  background: #fff; border: 1px solid #999; padding: 6px 8px; font-family: sans-serif; font-size: 12px;
  line-height: 1.5; white-space: normal; box-shadow: 0 2px 6px rgba(0, 0, 0, 0.25); }}
.tok:hover .tip {{ display: block; }}
.tip .h {{ display: block; font-weight: bold; margin-top: 4px; }}
.tip .c {{ display: block; }}
.agreeing {{ color: #1a7f37; font-weight: bold; }}
small {{ color: #777; }}
table {{ border-collapse: collapse; font-size: 13px; margin-top: 1em; }}
td, th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }}
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _concept_html(concept: int, descriptions: Optional[Dict[int, str]], agree: set,
                  latent_url: Optional[str] = None) -> str:
    text = (descriptions or {}).get(concept)
    number = f"<small>{concept}</small>" if text is not None and text.strip() else _e(concept)
    if latent_url:
        number = f'<a href="{_e(latent_url)}#latent-{concept}">{number}</a>'
    name = f"{_e(text)} {number}" if text is not None and text.strip() else number
    return f'<span class="agreeing">{name}</span>' if concept in agree else name


def _predicted_html(row: TokenConcepts, descriptions, agree: set, tag: str, latent_url: Optional[str]) -> List[str]:
    return [f'<{tag} class="c">{_concept_html(c, descriptions, agree, latent_url)} '
            f'<small>logit {v:.3f}, p {p:.3f}</small></{tag}>'
            for c, v, p in zip(row.concept_ids, row.concept_logits, row.concept_probs)]


def _labels_html(row: TokenConcepts, descriptions, agree: set, tag: str, latent_url: Optional[str]) -> List[str]:
    labelled = [c for c in row.labels or () if c != NO_LABEL]
    return [f'<{tag} class="c">{_concept_html(c, descriptions, agree, latent_url)}</{tag}>' for c in labelled] or \
        [f'<{tag} class="c">none</{tag}>']


def render_html(rows: Sequence[TokenConcepts], descriptions: Optional[Dict[int, str]] = None, title: str = "Concepts",
                notes: Sequence[str] = (), latent_url: Optional[str] = None) -> str:
    """A self-contained page: the text with each token coloured by the softmax probability of its top predicted
    concept, its concepts (and teacher labels) shown on hover, and the same as a table. With `latent_url` (the
    page tools/describe_latents.py wrote, as a link from this one) each concept id links to its card there."""
    with_labels = any(row.labels is not None for row in rows)
    top = len(rows[0].concept_ids) if rows else 0
    tokens = []
    for row in rows:
        agree = row.agreeing()
        tip = [f'<span class="h">#{row.position}, token {row.token_id}</span>',
               f'<span class="h">top {top} predicted concepts</span>',
               *_predicted_html(row, descriptions, agree, "span", latent_url)]
        if with_labels:
            tip += ['<span class="h">teacher labels</span>', *_labels_html(row, descriptions, agree, "span", latent_url)]
        # A token holding part of a character has no text of its own: .part keeps it visible and hoverable.
        classes = "tok" + (" agree" if agree else "") + ("" if row.text else " part")
        tokens.append(f'<span class="{classes}" style="background-color: rgba({_COLOUR}, {row.confidence:.3f})">'
                      f'{_e(row.text)}<span class="tip">{"".join(tip)}</span></span>')
    head = ["#", "token", f"top {top} predicted concepts"] + (["teacher labels"] if with_labels else [])
    table = ["<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        agree = row.agreeing()
        cells = [_e(row.position), f"<code>{_e(json.dumps(row.text, ensure_ascii=False))}</code>",
                 "".join(_predicted_html(row, descriptions, agree, "div", latent_url))]
        if with_labels:
            cells.append("".join(_labels_html(row, descriptions, agree, "div", latent_url)))
        table.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    hover = f"its top {top} predicted concepts (logit and probability)"
    legend = (f"Colour: softmax probability (over all concepts) of the token's top predicted concept, "
              f"0 [scale] 1. Hover a token for {hover}")
    if with_labels:
        legend += (" and the teacher's attribution labels. Underlined green: a top predicted concept is also one of "
                   "the token's teacher labels (bold green in the lists).")
    legend = _e(legend + ("" if with_labels else ".")).replace("[scale]", '<span class="scale"></span>')
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{_e(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(title)}</h1>",
        *(f'<p class="meta">{_e(note)}</p>' for note in notes),
        f'<p class="legend">{legend}</p>',
        f'<div class="text">{"".join(tokens)}</div>',
        f"<h2>All tokens</h2>\n<table>\n{chr(10).join(table)}\n</table>",
        "</body>",
        "</html>",
        "",
    ])
