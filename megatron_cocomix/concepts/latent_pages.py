"""The latents of an SAE as one self-contained HTML page (tools/describe_latents.py --html), from the records of
concepts/descriptions.py: one card per latent that fired (its description, frequency, mean and largest activation,
top tokens, and top contexts with each token shaded by the latent's activation on it, the max-activating token
outlined), an index of the live latents by frequency, and the ids of the dead ones. Inline CSS only: no script,
and nothing loaded from elsewhere. A card's anchor is #latent-ID, so other pages can link to it.
"""

from __future__ import annotations

import html
from typing import List, Sequence

_COLOUR = "255, 127, 14"
_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 72em; }
.meta { color: #555; font-size: 13px; margin: 0.2em 0; }
.index { columns: 16em; font-size: 12px; margin: 1em 0; }
.index a { display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.card { border: 1px solid #ddd; border-radius: 4px; padding: 0.6em 1em; margin: 1em 0; }
.card h2 { font-size: 16px; margin: 0.2em 0; }
.stats { color: #555; font-size: 13px; margin: 0.3em 0; }
.chip { display: inline-block; border: 1px solid #ccc; border-radius: 3px; padding: 0 4px; margin: 0 4px 4px 0;
  font-family: monospace; font-size: 13px; }
.chip small, .ctx .v { color: #777; }
.ctx { font-family: monospace; font-size: 13px; line-height: 1.9; white-space: pre; overflow-x: auto; }
.ctx .v { display: inline-block; width: 5em; }
.a { border-radius: 2px; }
.max { outline: 2px solid #c0392b; font-weight: bold; }
.dead { font-size: 12px; color: #555; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _visible(piece: str) -> str:
    """A piece of a context on one line: newlines and tabs as symbols, spaces kept (white-space: pre)."""
    return piece.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")


def _context_html(context: dict, max_activation: float) -> str:
    spans = []
    for i, (piece, value) in enumerate(zip(context["tokens"], context["activations"])):
        text = _e(_visible(piece)) or "&#8203;"  # a piece holding part of a character: keep it visible
        if value > 0 or i == context["highlight"]:
            alpha = min(1.0, value / max_activation) if max_activation else 0.0
            classes = "a max" if i == context["highlight"] else "a"
            spans.append(f'<span class="{classes}" style="background-color: rgba({_COLOUR}, {alpha:.3f})" '
                         f'title="{value:.3f}">{text}</span>')
        else:
            spans.append(text)
    return f'<div class="ctx"><span class="v">{context["activation"]:.3f}</span>{"".join(spans)}</div>'


def _card(record: dict) -> str:
    c = record["index"]
    tokens = "".join(f'<span class="chip">{_e(_visible(t["text"]))} <small>{t["count"]}</small></span>'
                     for t in record["top_tokens"])
    contexts = "\n".join(_context_html(context, record["max_activation"]) for context in record["contexts"])
    return "\n".join([
        f'<section class="card" id="latent-{c}">',
        f"<h2>Latent {c}: {_e(record['description'])}</h2>",
        f'<p class="stats">fires on {record["frequency"]:.3%} of tokens ({record["fired"]:,} of '
        f'{record["tokens"]:,}); mean activation {record["mean_activation"]:.3f}, max '
        f'{record["max_activation"]:.3f}</p>',
        f'<p class="stats">top tokens (count): {tokens}</p>',
        '<p class="stats">top contexts (activation, then the text; shading: activation / max, outlined: the '
        'max-activating token; hover a token for its activation)</p>',
        contexts,
        "</section>",
    ])


def render_latent_page(records: Sequence[dict], title: str, notes: Sequence[str] = ()) -> str:
    """The page for the records of all latents (module docstring)."""
    live = [r for r in records if not r["dead"]]
    dead = [r["index"] for r in records if r["dead"]]
    by_frequency = sorted(live, key=lambda r: (-r["frequency"], r["index"]))
    index = "".join(f'<a href="#latent-{r["index"]}">{r["index"]}: {_e(r["description"])} '
                    f'<small>({r["frequency"]:.2%})</small></a>' for r in by_frequency)
    body: List[str] = [
        f"<h1>{_e(title)}</h1>",
        *(f'<p class="meta">{_e(note)}</p>' for note in notes),
        f'<p class="meta">{len(records):,} latents: {len(live):,} fired, {len(dead):,} dead. Below, the latents '
        f"that fired, most frequent first; then one card per latent, in index order.</p>",
        f'<nav class="index">{index}</nav>',
        *(_card(r) for r in live),
    ]
    if dead:
        # Each with its anchor too, so that a link to any latent (concepts.html's) lands somewhere.
        anchored = ", ".join(f'<span id="latent-{c}">{c}</span>' for c in dead)
        body.append(f'<p class="dead">Dead latents (no activation on the tokens read): {anchored}</p>')
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      f"<title>{_e(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>", *body,
                      "</body>", "</html>", ""])
