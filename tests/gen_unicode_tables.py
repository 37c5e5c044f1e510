#!/usr/bin/env python3
"""Regenerate the Unicode class tables inside tokenizer.c (between the GENERATED markers).

    apt-get install unicode-data        # the Unicode Character Database, /usr/share/unicode
    python3 tests/gen_unicode_tables.py [UCD_DIR]

The GPT-2 pre-split pattern needs three classes, as Hugging Face tokenizers' regex engine
defines them: \\p{L} (general categories Lu Ll Lt Lm Lo), \\p{N} (Nd Nl No) and \\s (the
White_Space property: it includes U+0085, not U+FEFF). Each becomes a sorted table of
inclusive code point ranges for binary search.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, "tokenizer.c")
BEGIN, END = "/* BEGIN GENERATED UNICODE TABLES", "/* END GENERATED UNICODE TABLES */"


def categories(ucd):
    cats, first = {}, None
    with open(os.path.join(ucd, "UnicodeData.txt"), encoding="utf-8") as f:
        for line in f:
            fields = line.split(";")
            cp, name, cat = int(fields[0], 16), fields[1], fields[2]
            if name.endswith(", First>"):
                first = cp
                continue
            if name.endswith(", Last>"):  # a range such as CJK ideographs or Hangul syllables
                for c in range(first, cp + 1):
                    cats[c] = cat
                continue
            cats[cp] = cat
    return cats


def white_space(ucd):
    out = set()
    with open(os.path.join(ucd, "PropList.txt"), encoding="utf-8") as f:
        for line in f:
            m = re.match(r"([0-9A-F]+)(?:\.\.([0-9A-F]+))?\s*; White_Space\b", line)
            if m:
                lo = int(m.group(1), 16)
                out.update(range(lo, int(m.group(2) or m.group(1), 16) + 1))
    return out


def ranges(cps):
    out = []
    for c in sorted(cps):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def c_table(name, rs):
    lines, line = [], ""  # as many ranges to a line as fit in 110 columns
    for cell in (f"{{0x{a:X},0x{b:X}}}," for a, b in rs):
        if len(line) + len(cell) > 106:
            lines.append(line)
            line = ""
        line += cell
    lines.append(line[:-1])
    body = "\n    ".join(lines)
    return f"static const uint32_t {name}[][2] = {{\n    {body}}};\n"


def main():
    ucd = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/unicode"
    with open(os.path.join(ucd, "ReadMe.txt"), encoding="utf-8") as f:
        date = re.search(r"Date: (\S+)", f.read()).group(1)
    with open(os.path.join(ucd, "DerivedAge.txt"), encoding="utf-8") as f:
        version = re.search(r"DerivedAge-([\d.]+)\.txt", f.read()).group(1)
    cats = categories(ucd)
    letter = ranges(c for c, k in cats.items() if k in ("Lu", "Ll", "Lt", "Lm", "Lo"))
    number = ranges(c for c, k in cats.items() if k in ("Nd", "Nl", "No"))
    space = ranges(white_space(ucd))
    block = (f"{BEGIN}: tests/gen_unicode_tables.py from the Unicode Character\n"
             f" * Database {version} ({date}); do not edit by hand */\n"
             + c_table("unicode_letter", letter) + c_table("unicode_number", number)
             + c_table("unicode_space", space) + END)
    with open(TARGET, encoding="utf-8") as f:
        src = f.read()
    start, end = src.index(BEGIN), src.index(END) + len(END)
    with open(TARGET, "w", encoding="utf-8") as f:
        f.write(src[:start] + block + src[end:])
    print(f"Unicode {version}: {len(letter)} letter, {len(number)} number, {len(space)} space ranges")


if __name__ == "__main__":
    main()
