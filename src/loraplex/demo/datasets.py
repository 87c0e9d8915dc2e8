"""The demo datasets by name: small, real labelled datasets built at run time from text that ships with the
machine's software.

Nothing is downloaded and no third-party text is stored in this repository: every dataset is rebuilt from files
already on the machine (the Python standard library, C headers under ``/usr/include``, shell scripts, Perl modules,
licence texts, package documentation and man pages) and cached as JSONL + CSV under ``~/.cache/loraplex/data``
(or ``$LORAPLEX_CACHE/data``). Seven datasets are provided (see :func:`describe_datasets` for the exact recipe of
each), each built in the module of its source:

* ``text_kind``      (:mod:`~loraplex.demo.prose`) -- classify a snippet as ``python`` / ``c_header`` / ``shell`` /
  ``prose``.
* ``code_language``  (:mod:`~loraplex.demo.code`) -- classify a code snippet by language (whichever of python / c /
  shell / perl the machine has enough files for).
* ``entities``       (:mod:`~loraplex.demo.prose`, tags from :mod:`~loraplex.demo.entities`) -- English prose with
  silver BIO entity tags from precise regexes (NUMBER, DATE, URL, EMAIL, VERSION, PATH).
* ``domains``        (:mod:`~loraplex.demo.prose`) -- causal-LM domain text (code / prose / shell) for domain
  adapters and a router.
* ``licences``       (:mod:`~loraplex.demo.licences`) -- classify a licence-text snippet by licence family (gpl /
  lgpl / bsd / mit / ...), from Debian machine-readable copyright files, with the family names removed from the
  text.
* ``man_sections``   (:mod:`~loraplex.demo.manpages`) -- classify man-page text (rendered from troff under
  ``/usr/share/man``) by its manual section, with the section number removed from the text.
* ``man_languages``  (:mod:`~loraplex.demo.manpages`) -- classify a snippet of a translated man page
  (``/usr/share/man/<lang>``) by its (Latin-script) human language: German, French, Swedish, Portuguese, ...

Train / validation / test are always drawn from *disjoint source files*: a hash of the file path decides the split
of every snippet taken from that file, and every row records its ``source``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from loraplex.demo.code import CODE_LANGUAGE_DESCRIPTION, build_code_language
from loraplex.demo.licences import LICENCES_DESCRIPTION, build_licences
from loraplex.demo.manpages import (MAN_LANGUAGES_DESCRIPTION, MAN_SECTIONS_DESCRIPTION, build_man_languages,
                                    build_man_sections)
from loraplex.demo.prose import (DOMAINS_DESCRIPTION, ENTITIES_DESCRIPTION, TEXT_KIND_DESCRIPTION, build_domains,
                                 build_entities, build_text_kind)
from loraplex.demo.sampling import Sizes
from loraplex.demo.sources import SourceSet
from loraplex.demo.text import DatasetBuildError, Reader

#: Dataset names accepted by :func:`build_dataset`.
DATASET_NAMES: tuple[str, ...] = (
    "text_kind", "code_language", "entities", "domains", "licences", "man_sections", "man_languages"
)

#: Builder of each dataset: ``builder(cache_dir=, seed=, sizes=, ...)`` -> split -> rows.
BUILDERS: dict[str, Callable[..., dict[str, list[dict[str, Any]]]]] = {
    "text_kind": build_text_kind,
    "code_language": build_code_language,
    "entities": build_entities,
    "domains": build_domains,
    "licences": build_licences,
    "man_sections": build_man_sections,
    "man_languages": build_man_languages,
}

#: Markdown recipe of each dataset (also written to its cache manifest).
DESCRIPTIONS: dict[str, str] = {
    "text_kind": TEXT_KIND_DESCRIPTION,
    "code_language": CODE_LANGUAGE_DESCRIPTION,
    "entities": ENTITIES_DESCRIPTION,
    "domains": DOMAINS_DESCRIPTION,
    "licences": LICENCES_DESCRIPTION,
    "man_sections": MAN_SECTIONS_DESCRIPTION,
    "man_languages": MAN_LANGUAGES_DESCRIPTION,
}


def build_dataset(name: str, **kwargs: Any) -> dict[str, list[dict[str, Any]]]:
    """Build (or read from cache) one dataset by name; ``kwargs`` go to its ``build_*`` function."""
    if name not in BUILDERS:
        raise DatasetBuildError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)}")
    return BUILDERS[name](**kwargs)


def build_all(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: Sizes = None,
    entity_sizes: Sizes = None,
    domain_sizes: Sizes = None,
    licence_sizes: Sizes = None,
    man_sizes: Sizes = None,
    *,
    max_files: int = 300,
    licence_max_files: int = 1000,
    man_max_files: int = 300,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Build (or read from cache) the six datasets other than ``man_languages`` (which needs
    translated man pages, often not installed; build it with :func:`build_dataset`): name -> split -> rows.

    ``sizes`` is per class for ``text_kind`` and ``code_language``, ``domain_sizes`` per
    domain (defaults to ``sizes``), ``licence_sizes`` per licence family (defaults to ``sizes``,
    else :data:`~loraplex.demo.licences.DEFAULT_LICENCE_SIZES`), ``entity_sizes`` total per split.
    ``licences`` reads up to ``licence_max_files`` copyright files (or ``sources["copyright"]`` when
    present): it needs all of them, as licence bodies repeat a lot.  ``man_sections`` reads up to
    ``man_max_files`` pages per manual section (or the ``man<N>`` entries of ``sources`` when present),
    ``man_sizes`` rows per section (defaults to ``sizes``, else
    :data:`~loraplex.demo.sampling.DEFAULT_CLASS_SIZES`).  Source discovery and file reading are shared
    between the datasets (one :class:`~loraplex.demo.text.Reader`).
    """
    reader = Reader()  # discovery is memoised per process; the reader shares parsed files
    common: dict[str, Any] = dict(
        cache_dir=cache_dir, seed=seed, max_files=max_files, use_cache=use_cache, sources=sources, reader=reader
    )
    return {
        "text_kind": build_text_kind(sizes=sizes, **common),
        "code_language": build_code_language(sizes=sizes, **common),
        "entities": build_entities(sizes=entity_sizes, **common),
        "domains": build_domains(sizes=domain_sizes if domain_sizes is not None else sizes, **common),
        "licences": build_licences(
            sizes=licence_sizes if licence_sizes is not None else sizes,
            **dict(common, max_files=licence_max_files),
        ),
        "man_sections": build_man_sections(
            sizes=man_sizes if man_sizes is not None else sizes,
            **dict(common, max_files=man_max_files),
        ),
    }


_COMMON_DESCRIPTION = (
    "All datasets are built at run time from files already installed on the machine (nothing is "
    "downloaded or shipped with loraplex) and cached as JSONL and CSV with a `manifest.json` of "
    "the build parameters under `~/.cache/loraplex/data` (override with `cache_dir=` or "
    "`LORAPLEX_CACHE`, which sets the cache root, data going to `$LORAPLEX_CACHE/data`). At most "
    "300 files per source kind are read, picked by a hash of the path. **Splits are by source "
    "file**: a hash of each file's path sends all of its snippets to train (70% of files), "
    "validation (10%) or test (20%), and every row records its `source` path. Identical snippets "
    "(ignoring case and whitespace) are kept once, in the test split first, so no text repeats "
    "across splits. Classes are balanced in every split, sampling goes round-robin over files, and "
    "everything is deterministic given the seed and the installed files, so the exact texts differ "
    "between machines."
)


def describe_datasets() -> str:
    """Markdown text (one paragraph per dataset, plus the shared rules) for the README."""
    return "\n\n".join([_COMMON_DESCRIPTION, *(DESCRIPTIONS[n] for n in DATASET_NAMES)]) + "\n"
