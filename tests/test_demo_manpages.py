"""Man pages: troff rendering, snippets without section numbers, page picking, translated pages,
the man_sections and man_languages datasets."""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from loraplex.demo import manpages
from loraplex.demo.datasets import build_dataset
from loraplex.demo.manpages import (
    build_man_languages,
    build_man_sections,
    looks_english,
    man_language_snippets,
    man_snippets,
    names_man_section,
    scrub_section_refs,
)
from loraplex.demo.sources import SourceSet, discover_man_languages, pick_man_pages
from loraplex.demo.text import SPLITS, DatasetBuildError, normalize_key, split_for
from loraplex.demo.troff import man_escapes, man_page_sections, troff_to_text


def test_man_escapes_fonts_dashes_and_specials() -> None:
    assert man_escapes(r"\fBbold\fR, \fIital\fP, \f(CWcode\fP, \f[B]br\f[]") == "bold, ital, code, br"
    assert man_escapes(r"\-v \(em \e \&.x end") == "-v — \\ .x end"
    assert man_escapes(r"a\(xxb") == "a b"  # unknown special characters become a space
    assert man_escapes(r"\*(lqq\*(rq \s-1SMALL\s0 \(bu \[em] \\") == '"q" SMALL • — \\'
    assert man_escapes("no escapes here") == "no escapes here"
    # groff composed letters (translated pages use them): umlauts, acutes, cedilla, caron, ring, ß
    assert man_escapes(r"zusammengeh\(:orend użytkownik\('ow \[:a]\(,c\(~a\(ss\(vs\(oa \(Bq") == (
        "zusammengehörend użytkowników äçãßšå „"
    )


_MAN_PAGE = r""".\" Comment line: .SH NOT A HEADING (1)
.TH LS 1 "2024-01-01" "GNU coreutils 9.1" "User Commands"
.SH NAME
ls \- list directory contents
.SH SYNOPSIS
.B ls
[\fI\,OPTION\/\fR]... [\fI\,FILE\/\fR]...
.SH DESCRIPTION
List information about the
.B files
in a directory; see
.BR stat (2)
and
.IR dir (1).
.\" another comment
.PP
Mandatory arguments to long options are mandatory for short options too.
.TP
\fB\-a\fR, \fB\-\-all\fR
do not ignore entries starting with a dot, see \fBglob\fP(7)
.IP \(bu 2
a bullet item that is long enough to make a third line of the snippet here
.nf
.B code line one
  code line two
.fi
.SH "SEE ALSO"
.BR dir (1)
"""


def test_troff_to_text_requests_headings_and_comments() -> None:
    text = troff_to_text(_MAN_PAGE)
    assert text == (
        "NAME\nls - list directory contents\n\n"
        "SYNOPSIS\nls [OPTION]... [FILE]...\n\n"
        "DESCRIPTION\nList information about the files in a directory; see stat(2) and dir(1).\n\n"
        "Mandatory arguments to long options are mandatory for short options too.\n\n"
        "-a, --all\ndo not ignore entries starting with a dot, see glob(7)\n\n"
        "• a bullet item that is long enough to make a third line of the snippet here\n"
        "code line one\n  code line two\n\n"
        "SEE ALSO\ndir(1)"
    )
    assert "Comment" not in text and "coreutils" not in text and "\\" not in text
    # filled text is reflowed at 78 columns; .SH with a quoted argument gives the plain heading
    long = ".SH DESCRIPTION\n" + "\n".join(f"word{i}" for i in range(60)) + "\n"
    [(heading, lines)] = man_page_sections(long)
    assert heading == "DESCRIPTION" and len(lines) > 1 and all(len(ln) <= 78 for ln in lines)
    assert " ".join(lines) == " ".join(f"word{i}" for i in range(60))
    # tables, macro definitions and conditional blocks are dropped whole
    dropped = ".SH DESCRIPTION\n.de XX\nmacro body\n..\n.TS\nl l.\na\tb\n.TE\n.if n \\{\\\ninside\n.\\}\nkept\n"
    assert man_page_sections(dropped) == [("DESCRIPTION", ["kept"])]


def test_man_snippets_use_body_sections_without_section_numbers() -> None:
    snippets = man_snippets(_MAN_PAGE)
    assert snippets, troff_to_text(_MAN_PAGE)
    joined = "\n".join(snippets)
    assert "list directory contents" not in joined  # the NAME line is never used
    assert "see stat and dir." in joined and "glob\n" in joined + "\n"
    for sn in snippets:
        assert not re.search(r"\(\s*[1-9]\w*\s*\)", sn) and not names_man_section(sn)
        lines = [ln for ln in sn.split("\n") if ln.strip()]
        assert 3 <= len(lines) <= 12 and len(sn) <= 400
    assert scrub_section_refs("see ls(1), tzfile(5) data and printf (3p).") == "see ls, tzfile data and printf."
    assert scrub_section_refs("exit(0) and f(2023)") == "exit(0) and f(2023)"
    assert names_man_section("Section 7 of the manual") and names_man_section("try man 2 open")
    assert not names_man_section("see section 3.2 of RFC 3484 and version 2")
    # redirect (.so) and mdoc pages give nothing
    assert man_snippets(".so man3/other.3\n") == []
    assert man_snippets(".Dd March 1, 2020\n.Dt FOO 3\n.Sh DESCRIPTION\nText.\n") == []


def _write_man_page(folder: Path, name: str, paragraphs: int = 3) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    body = "\n.PP\n".join(
        f"The {name} page, paragraph {k}, explains option number {k} of {name} in some detail.\n"
        f"It spans a few source lines so that the rendered text of {name} has several\n"
        f"lines: this is line three of paragraph {k} and the {name} text goes on.\n"
        f"A fourth line about {name} closes paragraph {k} of the page."
        for k in range(paragraphs)
    )
    path = folder / f"{name}.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(f'.TH {name} 1 "2024"\n.SH NAME\n{name} \\- demo\n.SH DESCRIPTION\n{body}\n')
    return str(path)


def test_pick_man_pages_skips_aliases_redirects_and_suffixed_sections(tmp_path) -> None:
    man3 = tmp_path / "man3"
    real = _write_man_page(man3, "alpha.3")
    os.symlink(real, man3 / "alias.3.gz")  # an alias of alpha.3: read once
    _write_man_page(man3, "Some::Module.3pm")  # Perl module pages are not section 3
    with gzip.open(man3 / "redirect.3.gz", "wt") as fh:
        fh.write('.\\" comment\n.so man3/alpha.3\n')
    (man3 / "plain.3").write_text(".TH plain 3\n.SH DESCRIPTION\nText.\n")
    assert pick_man_pages([str(man3)], "3", 50) == sorted([real, str(man3 / "plain.3")])
    # one page family fills at most a tenth of the picks (at least 3)
    man1 = tmp_path / "man1"
    fam = [_write_man_page(man1, f"gcloud_cmd{i}.1", 1) for i in range(10)]
    other = [_write_man_page(man1, f"tool{i}.1", 1) for i in range(2)]
    picked = pick_man_pages([str(man1)], "1", 10)
    assert len(set(picked) & set(fam)) == 3 and set(other) <= set(picked)


def test_man_sections_error_when_too_few_sections(tmp_path, monkeypatch) -> None:
    pages = {n: sorted(_write_man_page(tmp_path / f"man{n}", f"page{n}x{i}.{n}") for i in range(60)) for n in "128"}

    def fake(*kinds_with_pages: str) -> dict[str, SourceSet]:
        return {
            f"man{n}": SourceSet(f"man{n}", pages[n] if n in kinds_with_pages else [], [f"/nowhere/man{n}"])
            for n in "123578"
        }

    monkeypatch.setattr(manpages, "discover_sources", lambda *a, **k: fake("1", "2"))
    with pytest.raises(DatasetBuildError, match=r"at least 3 manual sections") as err:
        build_man_sections(cache_dir=tmp_path, use_cache=False)
    msg = str(err.value)
    assert "library (man3): 0 page(s) < 40" in msg and "/nowhere/man3" in msg and "/nowhere/man8" in msg
    # a third section with enough pages: it builds, with exactly those three labels, balanced
    sizes = {"train": 10, "validation": 0, "test": 2}
    data = build_man_sections(sources=fake("1", "2", "8"), sizes=sizes, use_cache=False)
    assert {r["label"] for r in data["train"]} == {"user_commands", "system_calls", "admin_commands"}
    assert Counter(r["label"] for r in data["test"]) == {"user_commands": 2, "system_calls": 2, "admin_commands": 2}
    assert data["validation"] == []


_LANG_LINES = {
    "de": ("Die Seite {n} beschreibt Absatz {k} und erklärt die Einstellung {k} ausführlich.",
           "Diese Zeilen gehören zu {n} und werden beim Lesen der Datei geprüft.",
           "Hier steht die dritte Zeile von Absatz {k}, und der Text über {n} geht weiter.",
           "Eine vierte Zeile über {n} schließt Absatz {k} dieser Seite ab."),
    "fr": ("La page {n} décrit le paragraphe {k} et explique l'option {k} en détail.",
           "Ces lignes appartiennent à {n} et sont vérifiées pendant la lecture du fichier.",
           "Voici la troisième ligne du paragraphe {k}, et le texte sur {n} continue.",
           "Une quatrième ligne sur {n} termine le paragraphe {k} de cette page."),
    "sv": ("Sidan {n} beskriver stycke {k} och förklarar flaggan {k} i detalj.",
           "Dessa rader hör till {n} och kontrolleras när filen läses.",
           "Här är den tredje raden i stycke {k}, och texten om {n} fortsätter.",
           "En fjärde rad om {n} avslutar stycke {k} på denna sida."),
    "pt": ("A página {n} descreve o parágrafo {k} e explica a opção {k} em detalhe.",
           "Estas linhas pertencem a {n} e são verificadas durante a leitura do arquivo.",
           "Aqui está a terceira linha do parágrafo {k}, e o texto sobre {n} continua.",
           "Uma quarta linha sobre {n} termina o parágrafo {k} desta página."),
}


_FIRST_SECTION = (
    "Kopfzeile {n} ERSTERABSCHNITT mit einer langen Zusammenfassung der Seite,\n"
    "die über mehrere Zeilen geht und trotzdem nie in einem Schnipsel steht,\n"
    "weil der erste Abschnitt nur den Namen und die Kurzbeschreibung enthält."
)


_ENGLISH_PARAGRAPH = (
    "This paragraph of the page was not translated, so it is still written in English and\n"
    "the reader sees the original text with all the words that the English page has,\n"
    "which must never be given the label of the language of the page."
)


def _write_translated_page(folder: Path, lang: str, name: str, paragraphs: int = 2, english: bool = False) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    body = "\n.PP\n".join(
        "\n".join(line.format(n=name, k=k) for line in _LANG_LINES[lang]) for k in range(paragraphs)
    )
    extra = f".SH EXTRA\n{_ENGLISH_PARAGRAPH}\n" if english else ""
    path = folder / f"{name}.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(f'.TH {name} 1 "2024" "Paket 1.0" "Handbuch"\n.SH NAME\n{_FIRST_SECTION.format(n=name)}\n'
                 f".SH BESCHREIBUNG\n{body}\n{extra}")
    return str(path)


def test_looks_english_and_man_language_snippets() -> None:
    assert looks_english("This option is the default and the program uses it when you run it.")
    for other in ("Die Option ist in der Regel aktiv, wenn das Programm startet.",  # de
                  "Deze optie is in de regel actief als het programma start.",  # nl: "is", "in", "de"
                  "To jest domyślna opcja, a program jej używa.",  # pl: "to", "a"
                  "Programul are această opțiune în mod implicit.",  # ro: "are"
                  "Cette option est active par défaut, ou si le programme démarre."):
        assert not looks_english(other), other
    source = (
        '.TH ls 1 "2024" "coreutils 9.1" "Benutzerbefehle"\n.SH BEZEICHNUNG\n' + _FIRST_SECTION.format(n="ls") + "\n"
        ".SH BESCHREIBUNG\n" + "\n".join(ln.format(n="ls", k=1) for ln in _LANG_LINES["de"]) + "\n"
        ".SH BEISPIEL\n.nf\n-- 1 2 3 --\n+----+----+\n| 12 | 34 |\n+----+----+\n= 56 = 78 =\n.fi\n"
        ".SH FEHLER\n" + _ENGLISH_PARAGRAPH + "\n"
    )
    german = "\n".join(ln.format(n="ls", k=1) for ln in _LANG_LINES["de"])
    heading, rendered = man_page_sections(source)[1]
    assert heading == "BESCHREIBUNG" and normalize_key("\n".join(rendered)) == normalize_key(german)
    # one snippet: the German body; not the first section, the symbol block or the English paragraph
    assert man_language_snippets(source) == ["\n".join(rendered)]
    assert man_language_snippets(".so man1/ls.1\n") == []
    assert man_language_snippets(".Dd March 1, 2020\n.Dt FOO 1\n.Sh BESCHREIBUNG\n" + german) == []
    # a snippet needs a word of 3+ Latin letters (Cyrillic text gives none)
    cyrillic = ".SH ИМЯ\nимя\n.SH ОПИСАНИЕ\n" + "\n".join(["Это описание программы и её параметров."] * 4)
    assert man_language_snippets(cyrillic) == []


@pytest.fixture()
def translated_tree(tmp_path) -> Path:
    """A fake /usr/share/man with translated pages: 40 each in de, fr, sv; pt split over pt and pt_BR."""
    root = tmp_path / "man"
    for lang in ("de", "fr", "sv"):
        for i in range(40):
            _write_translated_page(root / lang / "man1", lang, f"prog{lang}{i}.1")
    for i in range(30):
        _write_translated_page(root / "pt" / "man1", "pt", f"progpt{i}.1")
    for i in range(25, 45):  # progpt25..29 exist in pt too: a page name counts once per language
        _write_translated_page(root / "pt_BR" / "man1", "pt", f"progpt{i}.1")
    _write_translated_page(root / "de" / "man5", "de", "conf.5")
    _write_translated_page(root / "de" / "man5", "de", "misplaced.1")  # man5 holds only *.5 pages
    os.symlink(root / "de" / "man1" / "progde0.1.gz", root / "de" / "man1" / "alias.1.gz")
    with gzip.open(root / "de" / "man1" / "redirect.1.gz", "wt") as fh:
        fh.write(".so man1/progde1.1\n")
    (root / "de" / "man1" / "bsd.1").write_text(".Dd March 1, 2020\n.Dt BSD 1\n.Sh BESCHREIBUNG\nText.\n")
    _write_translated_page(root / "ja" / "man1", "de", "nonlatin.1")  # not a Latin-script language
    _write_translated_page(root / "sr@latin" / "man1", "de", "modifier.1")  # folders with a modifier: out
    _write_translated_page(root / "man1", "de", "english.1")  # the English pages are no language folder
    return root


def test_discover_man_languages_folders_aliases_and_pt_merge(translated_tree) -> None:
    found = discover_man_languages(300, root=str(translated_tree))
    assert sorted(found) == ["man_de", "man_fr", "man_pt", "man_sv"]
    de = found["man_de"]
    assert de.searched == [str(translated_tree / "de" / "man1"), str(translated_tree / "de" / "man5")]
    names = sorted(os.path.basename(f) for f in de.files)
    # alias read once (as its target), .so redirect, mdoc page and misplaced page skipped
    assert names == sorted([f"progde{i}.1.gz" for i in range(40)] + ["conf.5.gz"])
    pt = found["man_pt"].files
    assert len(pt) == 45 and len({os.path.basename(f) for f in pt}) == 45
    assert {os.path.basename(os.path.dirname(os.path.dirname(f))) for f in pt} == {"pt", "pt_BR"}
    assert len(discover_man_languages(10, root=str(translated_tree))["man_fr"].files) == 10


def test_man_languages_build_from_translated_tree(translated_tree, tmp_path) -> None:
    sources = discover_man_languages(300, root=str(translated_tree))
    sizes = {"train": 6, "validation": 0, "test": 2}
    data = build_dataset("man_languages", cache_dir=tmp_path / "cache", sources=sources, sizes=sizes)
    assert data["validation"] == []
    for split in ("train", "test"):
        counts = Counter(r["label"] for r in data[split])
        assert counts == {lang: sizes[split] for lang in ("de", "fr", "pt", "sv")}, (split, counts)
        for r in data[split]:
            assert set(r) == {"text", "label", "source"} and split_for(r["source"]) == split
            lang_folder = os.path.basename(os.path.dirname(os.path.dirname(r["source"])))
            assert lang_folder.split("_")[0] == r["label"]
            assert "ERSTERABSCHNITT" not in r["text"] and "Handbuch" not in r["text"]
            # the text is one paragraph of the page's own body (reflowed to 78 columns)
            name = os.path.basename(r["source"])[:-3]
            assert normalize_key(r["text"]) in {
                normalize_key(" ".join(ln.format(n=name, k=k) for ln in _LANG_LINES[r["label"]])) for k in range(2)
            }, r
            assert max(map(len, r["text"].split("\n"))) <= 78
    keys = [normalize_key(r["text"]) for s in SPLITS for r in data[s]]
    assert len(keys) == len(set(keys))
    manifest = json.loads((tmp_path / "cache" / "man_languages" / "manifest.json").read_text())
    details = manifest["details"]
    assert details["languages"] == ["de", "fr", "pt", "sv"] and details["dropped_languages"] == {}
    assert details["language_pages"] == {"de": 41, "fr": 40, "pt": 45, "sv": 40}
    assert details["rows_per_class"] == sizes and details["shrunk"] == []
    again = build_man_languages(sources=sources, sizes=sizes, use_cache=False)
    assert again == data


def test_man_languages_error_when_too_few_languages(translated_tree, tmp_path, monkeypatch) -> None:
    sources = discover_man_languages(300, root=str(translated_tree))
    two = {k: v for k, v in sources.items() if k in ("man_de", "man_fr")}
    sv_train = [f for f in sources["man_sv"].files if split_for(f) == "train"][:2]
    two["man_sv"] = SourceSet("man_sv", sv_train, ["/nowhere/sv/man1"])
    monkeypatch.setattr(manpages, "discover_man_languages", lambda *a, **k: two)
    with pytest.raises(DatasetBuildError, match=r"^man_languages: need at least 3 languages") as err:
        build_man_languages(cache_dir=tmp_path, use_cache=False, sizes={"train": 2, "test": 1})
    msg = str(err.value)
    assert "found ['de', 'fr']" in msg and "sv: 2 page(s) < 40" in msg
    assert "/nowhere/sv/man1" in msg and str(translated_tree / "de" / "man1") in msg
    # with a lower page threshold the third language qualifies
    data = build_man_languages(use_cache=False, sizes={"train": 1, "test": 0}, min_files=2, min_snippets=1)
    assert Counter(r["label"] for r in data["train"]) == {"de": 1, "fr": 1, "sv": 1}
