"""Users' text files (configs, prompt lists, annotation lists, COCO JSON): UTF-8, read one way.

A byte order mark (which Windows editors write) is dropped; a byte that is not UTF-8 is named by
file, line and offset, in one wording wherever a text file is read.
"""

from __future__ import annotations


class NotText(ValueError):
    """A file that is not UTF-8 text; the message names the file, the line and the byte."""


def decode(data: bytes, shown: str) -> str:
    """`data` as text, a byte order mark dropped; `shown` is how the message names the file."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise NotText(f"{shown}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                      "save it as UTF-8") from None
