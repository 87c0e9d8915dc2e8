"""Man pages written in troff (``man`` macros) rendered to plain text, close to what ``man`` prints.

:func:`man_page_sections` gives ``(heading, lines)`` per ``.SH`` section; :func:`troff_to_text` joins them;
:func:`man_escapes` renders one line's escapes. Redirect pages (``.so``) and BSD ``mdoc`` pages are recognised
(:func:`is_man_redirect`, :func:`is_mdoc`) but not rendered.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

#: Column at which filled text is wrapped, as ``man`` does on an 80-column terminal.
MAN_WIDTH = 78

#: ``\(xx`` / ``\[xx]`` special characters rendered as text; any other one becomes a space.
_MAN_SPECIAL: dict[str, str] = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "bu": "•", "lq": '"', "rq": '"', "oq": "'", "cq": "'",
    "aq": "'", "dq": '"', "ga": "`", "aa": "'", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "pl": "+",
    "eq": "=", "co": "©", "rg": "®", "tm": "™", "mu": "×", "de": "°", ">=": "≥", "<=": "≤", "->": "→",
    "<-": "←", "+-": "±", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "ba": "|", "or": "|", "at": "@",
    "sh": "#", "Do": "$", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "<", "ra": ">",
    "Bq": "„", "bq": "‚",
}
#: Accents of groff's composed-letter escapes (``\(:o`` = ö, ``\('e`` = é, ``\(,c`` = ç, ``\(vs`` = š)
#: as Unicode combining marks.
_MAN_ACCENTS: dict[str, str] = {
    ":": "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303", ",": "\u0327",
    "v": "\u030c", "o": "\u030a", '"': "\u030b",
}
#: groff letters that are not an ASCII letter plus an accent.
_MAN_LETTERS: dict[str, str] = {
    "ss": "ß", "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "/o": "ø", "/O": "Ø", "/l": "ł", "/L": "Ł",
    "-D": "Đ", "Sd": "ð", "TP": "Þ", "Tp": "þ", ".i": "ı", "IJ": "Ĳ", "ij": "ĳ",
}


def _man_letter(name: str) -> str | None:
    """The letter named by a groff special character such as ``:o`` (ö), ``'e`` (é), ``ss`` (ß)."""
    if name in _MAN_LETTERS:
        return _MAN_LETTERS[name]
    if len(name) == 2 and name[0] in _MAN_ACCENTS and name[1].isascii() and name[1].isalpha():
        letter = unicodedata.normalize("NFC", name[1] + _MAN_ACCENTS[name[0]])
        return letter if len(letter) == 1 else None
    return None


#: ``\*(xx`` / ``\*[xx]`` strings (defined by the man macros, pod2man and DocBook preambles).
_MAN_STRINGS: dict[str, str] = {
    "lq": '"', "rq": '"', 'L"': '"', 'R"': '"', "C`": '"', "C'": '"', "Aq": "'", "aq": "'", "Tm": "™",
    "R": "®", "Lt": "<", "Gt": ">", "Am": "&", "Ba": "|", "Ne": "≠", "Le": "≤", "Ge": "≥", "Pi": "π",
    "Ec": "", "Eo": "", "S": "",
}
#: One-character escapes (``\X``); an unknown one renders as the character itself.
_MAN_CHARS: dict[str, str] = {
    "-": "-", "e": "\\", "E": "\\", "\\": "\\", "&": "", "|": "", "^": "", " ": " ", "0": " ", "~": " ",
    "c": "", ":": "", "%": "", "'": "'", "`": "`", ".": ".", "t": " ", "d": "", "u": "", "r": "",
    "p": "", "/": "", ",": "", "a": "", "{": "", "}": "", "!": "", ")": "", "\n": "",
}
_MAN_ESC = re.compile(
    r"\\(?:"
    r"(?P<font>f(?:\[[^\]\n]*\]|\(..|.))"  # \fB \fI \fR \fP \f(CW \f[B]
    r"|\((?P<sp2>..)"  # \(em
    r"|\[(?P<spl>[^\]\n]*)\]"  # \[em] \[u00E9]
    r"|\*(?P<str>\[[^\]\n]*\]|\(..|.)"  # \*(lq \*R \*[name]
    r"|(?P<size>s(?:[+-]?\(\d\d|[+-]?\d|\[[^\]\n]*\]|'[^'\n]*'))"  # \s-1 \s0 \s(12
    r"|(?P<reg>n[+-]?(?:\[[^\]\n]*\]|\(..|.))"  # number registers \n(.g
    r"|N'(?P<num>\d+)'"  # \N'65'
    r"|(?P<arg>[hvwolLDXZbRSxHCAB]'[^'\n]*')"  # motions, widths, overstrikes, device controls
    r"|(?P<sel>[mMFYVkzg$](?:\[[^\]\n]*\]|\(..|.))"  # colours, families, marks, macro arguments
    r"|(?P<char>.)"
    r")",
    re.S,
)
#: A comment (``\"`` or ``\#``) not preceded by an escaping backslash; group 1 is the text before it.
_MAN_COMMENT = re.compile(r'^((?:[^\\]|\\[^"#])*)\\["#]')
#: Request arguments: ``"quoted ""words"""`` or runs of non-space characters (escaped spaces kept).
_MAN_ARG = re.compile(r'"((?:[^"]|"")*)"?|((?:\\.|[^\s\\]|\\)+)')
_MAN_FONT_SPACED = frozenset({"B", "I", "SM", "SB"})
_MAN_FONT_JOINED = frozenset({"BR", "BI", "IB", "IR", "RB", "RI"})
_MAN_PARAGRAPH = frozenset({"PP", "P", "LP", "HP", "sp", "Sp"})
_MAN_NOFILL = frozenset({"nf", "EX", "Vb"})
_MAN_FILL = frozenset({"fi", "EE", "Ve"})
#: Blocks dropped whole: tables, equations, pictures (to their end macro), macro definitions and
#: ``.ig`` blocks (to ``..`` or the end name given).
_MAN_BLOCKS = {"TS": "TE", "EQ": "EN", "PS": "PE", "de": "..", "de1": "..", "am": "..", "am1": "..", "ig": ".."}
#: Man-macro requests whose arguments are not text (header/footer, index entries, layout).
_MAN_DROP = frozenset({
    "TH", "IX", "UC", "DT", "AT", "PD", "RS", "RE", "YS", "ME", "LO", "Dd", "Dt", "Os",
    "INDENT", "UNINDENT", "LINKSTYLE",  # docutils (rst2man) and util-linux preambles
})
#: Requests and macros that end the current output line (without a blank line).
_MAN_BREAK = frozenset({"br", "in", "ti", "ce", "bp", "RS", "RE", "INDENT", "UNINDENT"})
#: Arguments that are only numbers or sizes (``3.5``, ``-4n``): layout, not text.
_MAN_NUMERIC_ARGS = re.compile(r"^(?:\s*[-+]?(?:\d+\.?\d*|\.\d+)[a-z]?\s*)*$")


def _man_esc_repl(m: re.Match[str]) -> str:
    if m.group("font") is not None or m.group("size") is not None or m.group("reg") is not None:
        return ""
    if m.group("arg") is not None or m.group("sel") is not None:
        return ""
    name = m.group("sp2") if m.group("sp2") is not None else m.group("spl")
    if name is not None:
        if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name) and int(name[1:], 16) < 0x110000:
            return chr(int(name[1:], 16))  # \[u00E9]
        if name in _MAN_SPECIAL:
            return _MAN_SPECIAL[name]
        letter = _man_letter(name)
        return " " if letter is None else letter
    s = m.group("str")
    if s is not None:
        key = s[1:-1] if s.startswith("[") else s[1:] if s.startswith("(") else s
        return _MAN_STRINGS.get(key, "")
    if m.group("num") is not None:
        n = int(m.group("num"))
        return chr(n) if 32 <= n < 0x110000 else ""
    ch = m.group("char")
    return _MAN_CHARS.get(ch, ch)


def man_escapes(text: str) -> str:
    """Plain text of one line of troff text: escapes rendered (``\\fB`` and other font changes and
    size changes removed, ``\\-`` -> ``-``, ``\\(em`` -> ``—``, ``\\e`` -> ``\\``, ``\\&`` -> nothing,
    a few common ``\\(xx`` characters and ``\\*(xx`` strings as text, other ``\\(xx`` -> a space)."""
    return _MAN_ESC.sub(_man_esc_repl, text) if "\\" in text else text


def _strip_man_comment(line: str) -> tuple[str, bool]:
    """(``line`` without its ``\\"`` comment, whether it had one)."""
    if '\\"' not in line and "\\#" not in line:
        return line, False
    m = _MAN_COMMENT.match(line)
    return (m.group(1), True) if m else (line, False)


def _man_args(rest: str) -> list[str]:
    """Arguments of a request line (after its name), rendered by :func:`man_escapes`."""
    if '"' not in rest and "\\" not in rest:
        return rest.split()
    out = []
    for m in _MAN_ARG.finditer(rest):
        out.append(man_escapes(m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2)))
    return out


def _man_first_request(source: str) -> str | None:
    """Name of the first request of a page (comments and blank lines skipped), or None."""
    for line in source.split("\n"):
        body, _ = _strip_man_comment(line)
        if not body.strip():
            continue
        if body[:1] in (".", "'"):
            parts = body[1:].split(None, 1)
            if parts:
                return parts[0]
            continue
        return None
    return None


def is_man_redirect(source: str) -> bool:
    """True for a redirect-only page (its first request is ``.so other/page.N``)."""
    return _man_first_request(source) == "so"


def is_mdoc(source: str) -> bool:
    """True for a page written with the BSD ``mdoc`` macros (``.Dd``/``.Dt``), which are not rendered."""
    return re.search(r"^\.\s*D[dt]\b", source[:20000], re.M) is not None


_WRAP_RES: dict[int, re.Pattern[str]] = {}


def _wrap_re(width: int) -> re.Pattern[str]:
    """Pattern whose matches are the lines of single-spaced text greedily wrapped at ``width``."""
    if width not in _WRAP_RES:
        _WRAP_RES[width] = re.compile(rf"(.{{1,{width}}})(?: |$)|(\S+)(?: |$)")
    return _WRAP_RES[width]


class _ManRenderer:
    """Renders ``man``-macro troff source into (heading, lines) sections; see :func:`man_page_sections`."""

    def __init__(self, width: int, wanted: Callable[[str], bool] | None = None) -> None:
        self.width = width
        self.wanted = wanted
        self.active = wanted is None or wanted("")  # is the current section rendered?
        self.done_lines = 0  # lines of rendered sections before the current one
        self.sections: list[tuple[str, list[str]]] = [("", [])]
        self.fill = True
        self.cur = ""
        self.join_next = False
        self.pending: str | None = None  # "heading" (bare .SH) or "tag" (.TP)

    # -- output
    def _lines(self) -> list[str]:
        return self.sections[-1][1]

    def flush(self) -> None:
        text = " ".join(self.cur.split())
        self.cur = ""
        self.join_next = False
        if not text:
            return
        if len(text) <= self.width:
            self._lines().append(text)
            return
        # greedy wrap: as many words as fit; a word longer than the width gets a line of its own
        self._lines().extend(m.group(1) or m.group(2) for m in _wrap_re(self.width).finditer(text))

    def para(self) -> None:
        self.flush()
        lines = self._lines()
        if lines and lines[-1] != "":
            lines.append("")

    def heading(self, text: str) -> None:
        self.flush()
        while self._lines() and self._lines()[-1] == "":
            self._lines().pop()
        heading = " ".join(text.split())
        if self.active:
            self.done_lines += len(self._lines())
        self.sections.append((heading, []))
        self.active = self.wanted is None or self.wanted(heading)
        self.fill = True
        self.pending = None

    def text(self, text: str, join: bool = False, leading_space: bool = False) -> None:
        """Add rendered text; ``join``: the source line ended with ``\\c`` (no space before the next)."""
        if self.pending == "heading":
            if text.strip():
                self.heading(text)
            return
        if not self.active:
            return
        if not self.fill:
            self.pending = None
            if self.join_next:
                self.cur += text
            else:
                self.flush()
                self.cur = text
            if join:
                self.join_next = True
                return
            line = self.cur.rstrip()
            self.cur = ""
            self.join_next = False
            self._lines().append(line.expandtabs(8))
            return
        if leading_space and not self.join_next:
            self.flush()
        if self.join_next:
            self.cur += text.lstrip()
        else:
            self.cur += (" " if self.cur else "") + text.strip()
        self.join_next = join
        if self.pending == "tag" and not join and self.cur.strip():
            self.pending = None
            self.flush()

    # -- input
    def request(self, name: str, rest: str) -> None:
        if name in ("SH", "Sh"):
            args = _man_args(rest)
            if args:
                self.heading(" ".join(args))
            else:
                self.flush()
                self.pending = "heading"
            return
        if name in _MAN_NOFILL or name in _MAN_FILL:
            self.flush()
            self.fill = name in _MAN_FILL
            return
        if (not self.active and self.pending != "heading") or name in _MAN_DROP or not name[:1].isupper():
            if self.active:
                if name in _MAN_BREAK:
                    self.flush()
                elif name in _MAN_PARAGRAPH:  # .sp, .Sp
                    self.paragraph()
            return  # troff requests (lower case: .ds, .nr, .ft, .in, .ad, ...) and layout macros
        if name in _MAN_PARAGRAPH:
            self.paragraph()
        elif name in ("TP", "TQ"):
            (self.para if name == "TP" else self.flush)()
            self.pending = "tag"
        elif name in ("SS", "Ss"):
            self.para()
            args = _man_args(rest)
            if args:
                self.text(" ".join(args))
                self.flush()
            else:
                self.pending = "tag"
        elif name in _MAN_FONT_SPACED or name in _MAN_FONT_JOINED:
            joined = (" " if name in _MAN_FONT_SPACED else "").join(_man_args(rest))
            if joined.strip():
                self.text(joined)
        elif name == "IP":
            self.para()
            args = _man_args(rest)
            tag = args[0].strip() if args else ""
            if tag:
                self.text(tag)
                if len(tag) > 4:  # a long tag stands on its own line; a bullet starts the paragraph
                    self.flush()
        else:
            args = _man_args(rest)
            if not args:
                return
            if name == "MR":
                self.text(f"{args[0]}({args[1] if len(args) > 1 else ''}){''.join(args[2:])}")
            elif name == "UE":
                self.cur += "".join(args)
            elif name == "OP":
                self.text("[" + " ".join(args) + "]")
            elif name == "SY":
                self.flush()
                self.text(" ".join(args))
            elif not _MAN_NUMERIC_ARGS.match(" ".join(args)):
                self.text(" ".join(args))  # other man macros (.UR, .MT, .ZN, ...): keep the arguments

    def paragraph(self) -> None:
        """A paragraph break (``.PP``, ``.sp``): a blank line; in no-fill mode always one more."""
        if self.fill:
            self.para()
        else:
            self.flush()
            self._lines().append("")

    def rendered_lines(self) -> int:
        """Lines rendered so far in the sections that are rendered."""
        return self.done_lines + (len(self._lines()) if self.active else 0)

    def render(self, source: str, max_lines: int | None = None) -> list[tuple[str, list[str]]]:
        skip_until: str | None = None  # end request of a dropped block ("." for "..", "TE", ...)
        depth = 0  # nesting of a dropped conditional block \{ ... \}
        carry = ""  # a line ending in an escaped newline continues on the next one
        for n, raw in enumerate(source.replace("\r\n", "\n").split("\n")):
            if max_lines is not None and not n % 32 and self.rendered_lines() >= max_lines:
                break
            if carry:
                raw, carry = carry + raw, ""
            if skip_until is not None:
                s = raw.lstrip()
                if s[:1] in (".", "'") and s[1:].split(None, 1)[:1] == [skip_until]:
                    skip_until = None
                continue
            if depth > 0:
                depth += raw.count("\\{") - raw.count("\\}")
                continue
            line, had_comment = _strip_man_comment(raw)
            if not had_comment and line.endswith("\\") and (len(line) - len(line.rstrip("\\"))) % 2:
                carry = line[:-1]
                continue
            if line[:1] in (".", "'"):
                parts = line[1:].split(None, 1)
                if not parts:
                    continue
                name, rest = parts[0], parts[1] if len(parts) > 1 else ""
                if name in _MAN_BLOCKS:
                    end = _MAN_BLOCKS[name]
                    if end == "..":  # .de NAME [END] / .ig [END]: ends at ".." or ".END"
                        words = rest.split()
                        custom = words[0:1] if name == "ig" else words[1:2]
                        end = custom[0] if custom else "."
                    skip_until = end
                    continue
                if name in ("if", "ie", "el", "while"):
                    depth = max(0, line.count("\\{") - line.count("\\}"))
                    continue
                self.request(name, rest)
                continue
            if not self.active and self.pending != "heading":
                continue  # text of a section that is not rendered
            if not line.strip():
                if had_comment:
                    continue  # a comment-only line is not a blank line
                if self.fill:
                    self.para()
                else:
                    self.text("")
                continue
            join = "\\c" in line and re.search(r"(?<!\\)(?:\\\\)*\\c\s*$", line) is not None
            self.text(man_escapes(line), join=join, leading_space=line[:1] in (" ", "\t"))
        self.flush()
        out = []
        for heading, body_lines in self.sections:
            while body_lines and body_lines[-1] == "":
                body_lines.pop()
            while body_lines and body_lines[0] == "":
                body_lines.pop(0)
            if heading or body_lines:
                out.append((heading, body_lines))
        return out


def man_page_sections(
    source: str,
    width: int = MAN_WIDTH,
    wanted: Callable[[str], bool] | None = None,
    max_lines: int | None = None,
) -> list[tuple[str, list[str]]]:
    """``(heading, lines)`` for every ``.SH`` section of a man page written in troff (``man`` macros).

    A basic rendering, close to what ``man`` prints: comment lines (``.\\"``) and troff requests
    (``.ds``, ``.nr``, ``.ft``, ``.if ... \\{ ... \\}``, macro definitions, tables) are dropped, as is
    ``.TH`` (the header and footer line); ``.SH NAME`` starts the section headed ``NAME``;
    font macros keep their arguments (``.B ls`` -> ``ls``, ``.BR a (1)`` -> ``a(1)``);
    ``.PP``/``.TP``/``.IP``/``.sp`` break paragraphs (a ``.TP`` tag gets its own line, an ``.IP``
    tag starts its paragraph); other man macros keep their arguments; escapes are rendered by
    :func:`man_escapes`.  Filled text is reflowed and wrapped at ``width`` columns; ``.nf``/``.EX``
    blocks keep their lines.  Paragraphs are separated by one blank line.  With ``wanted``, only
    the sections whose heading it accepts get body lines (the others are parsed, not rendered);
    with ``max_lines``, rendering stops soon after that many body lines.
    """
    return _ManRenderer(width, wanted).render(source, max_lines)


def troff_to_text(source: str, width: int = MAN_WIDTH) -> str:
    """Plain text of a man page (see :func:`man_page_sections`): each heading on its own line,
    followed by its body; sections separated by a blank line."""
    blocks = []
    for heading, lines in man_page_sections(source, width):
        blocks.append("\n".join(([heading] if heading else []) + lines))
    return "\n\n".join(blocks)
